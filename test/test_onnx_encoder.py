"""The encoder through ONNX Runtime (model/onnx_encoder.py): same predictions as PyTorch on the
real LiteMedSAM weights, exported once per weight state into the cache, and the predictor falls
back to PyTorch (runtime auto, for an encoder whose spec asks for ONNX Runtime; none does since
session 17) or says why not (runtime onnx) where it cannot be used."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from conftest import REPO  # noqa: E402
from model import onnx_encoder  # noqa: E402
from model.checkpoint import encoder_weights_info, save_ensemble  # noqa: E402
from model.network import PFSAMNet, make_config  # noqa: E402
from model.onnx_encoder import OnnxEncoder, OnnxUnavailable, cache_dir  # noqa: E402
from model.predictor import Predictor  # noqa: E402
from synthetic import make_ultrasound  # noqa: E402


@pytest.fixture(scope="module")
def lite_ensemble(tmp_path_factory):
    """A frozen-LiteMedSAM SD-H + MGC-A ensemble (real encoder weights, random heads)."""
    torch.manual_seed(0)
    info = encoder_weights_info("litemedsam")  # frozen package weights: stored by reference, shared
    sd = PFSAMNet(make_config("litemedsam", "frozen", "sd-h", "gap", {"channels": [32, 16]}, encoder_weights=info))
    mg = PFSAMNet(make_config("litemedsam", "frozen", "sd-h", "mgc-a", {"channels": [32, 16]}, encoder_weights=info),
                  encoder=sd.encoder)
    return save_ensemble(tmp_path_factory.mktemp("lite") / "ens", {"sd-h": sd, "mgc-a": mg},
                         {"sd-h": 1.0, "mgc-a": 0.0}, {"sd-h": 0.0, "mgc-a": 1.0})


def _images():
    return [make_ultrasound(h, w, seed=s)[0] for s, (h, w) in enumerate([(300, 400), (512, 380), (200, 640)])] + \
        [make_ultrasound(350, 350, seed=9, lesion=False)[0]]


@pytest.mark.slow  # --runtime onnx is opt-in (PyTorch is the default and auto): an export, 4 images each way: 20 s
def test_onnx_runtime_gives_the_pytorch_predictions(lite_ensemble):
    torch_pred = Predictor.from_dir(lite_ensemble, device="cpu", batch_size=4, runtime="torch")
    ort_pred = Predictor.from_dir(lite_ensemble, device="cpu", batch_size=4, runtime="onnx")
    assert isinstance(next(iter(ort_pred.members.values())).encoder, OnnxEncoder)
    assert len({id(m.encoder) for m in ort_pred.members.values()}) == 1  # still one shared pass
    x = torch.rand(3, 3, 256, 256)
    with torch.no_grad():
        emb_t, _ = next(iter(torch_pred.members.values())).encoder(x)
        emb_o, feats = next(iter(ort_pred.members.values())).encoder(x)
    assert feats == [] and emb_o.shape == emb_t.shape == (3, 256, 64, 64)
    assert float((emb_o - emb_t).abs().max()) < 1e-4 * float(emb_t.abs().max())
    for a, b in zip(torch_pred.predict(_images()), ort_pred.predict(_images())):
        assert a.mask.shape == b.mask.shape
        assert (a.mask != b.mask).mean() < 1e-4  # at most a pixel on a boundary
        assert a.label == b.label
        assert max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities) < 1e-4


@pytest.fixture
def onnx_by_default(monkeypatch):
    """LiteMedSAM's spec asking for ONNX Runtime under runtime auto, as it did until session 17."""
    from dataclasses import replace

    from model.encoders import ENCODERS

    monkeypatch.setitem(ENCODERS, "litemedsam", replace(ENCODERS["litemedsam"], onnx_on_cpu=True))


def test_auto_runtime_is_pytorch_for_the_default_encoder(lite_ensemble):
    """LiteMedSAM's PyTorch encoder (fused attention, GELU inside oneDNN's ops) is now the faster."""
    auto = Predictor.from_dir(lite_ensemble, device="cpu")
    assert auto.encoder_runtime == "torch"
    assert next(iter(auto.members.values())).encoder.onednn_postops


def test_auto_runtime_uses_onnx_on_cpu_fp32_only_where_the_spec_asks(lite_ensemble, onnx_by_default):
    auto = Predictor.from_dir(lite_ensemble, device="cpu")
    assert isinstance(next(iter(auto.members.values())).encoder, OnnxEncoder)
    bf16 = Predictor.from_dir(lite_ensemble, device="cpu", precision="bf16")
    assert not isinstance(next(iter(bf16.members.values())).encoder, OnnxEncoder)
    with pytest.raises(ValueError, match="CPU in fp32 only"):
        Predictor.from_dir(lite_ensemble, device="cpu", precision="bf16", runtime="onnx")
    with pytest.raises(ValueError, match="runtime must be one of"):
        Predictor.from_dir(lite_ensemble, device="cpu", runtime="tensorrt")


def test_onnx_runtime_with_device_auto_runs_on_the_cpu_where_a_gpu_is_seen(lite_ensemble, monkeypatch):
    """-d auto (process.py's default) with --runtime onnx on a GPU host failed at load ("CPU in fp32
    only"): the runtime that only runs on the CPU makes auto the CPU, not the GPU it would pick."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pred = Predictor.from_dir(lite_ensemble, runtime="onnx")
    assert pred.device.type == "cpu" and pred.encoder_runtime == "onnxruntime"
    assert all(p.device.type == "cpu" for m in pred.members.values() for p in m.parameters())


def test_graph_is_exported_once_per_weight_state_and_reused(lite_ensemble, monkeypatch):
    Predictor.from_dir(lite_ensemble, device="cpu", runtime="onnx")
    graphs = sorted(cache_dir().glob("litemedsam-256-*-opset*.onnx"))
    assert len(graphs) == 1 and graphs[0].stat().st_size > 10e6  # 5.7 M fp32 parameters
    mtime = graphs[0].stat().st_mtime_ns

    def no_export(*a, **k):
        raise AssertionError("exported again although the graph is cached")

    monkeypatch.setattr(onnx_encoder, "export_bytes", no_export)
    Predictor.from_dir(lite_ensemble, device="cpu", runtime="onnx")
    assert graphs[0].stat().st_mtime_ns == mtime
    # other weights -> another digest -> another file
    enc = next(iter(Predictor.from_dir(lite_ensemble, device="cpu", runtime="torch").members.values())).encoder
    d1 = onnx_encoder.state_digest(enc)
    with torch.no_grad():
        next(enc.parameters()).add_(1e-3)
    assert onnx_encoder.state_digest(enc) != d1


def test_unwritable_cache_keeps_the_graph_in_memory(lite_ensemble, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("PFSAM_CACHE", str(blocker / "cache"))  # mkdir below a file fails
    pred = Predictor.from_dir(lite_ensemble, device="cpu", runtime="onnx")
    enc = next(iter(pred.members.values())).encoder
    assert isinstance(enc, OnnxEncoder) and enc.graph is None
    assert "cannot be cached there (Not a directory): it is kept in memory for this process only" \
        in capsys.readouterr().err
    assert pred.predict_one(_images()[0]).mask.shape == (300, 400)


def test_without_onnxruntime_auto_falls_back_and_onnx_says_why(lite_ensemble, monkeypatch, onnx_by_default):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    pred = Predictor.from_dir(lite_ensemble, device="cpu")
    assert not isinstance(next(iter(pred.members.values())).encoder, OnnxEncoder)
    with pytest.raises(OnnxUnavailable, match="onnxruntime is not installed"):
        Predictor.from_dir(lite_ensemble, device="cpu", runtime="onnx")


def test_onnx_refuses_an_encoder_whose_stage_features_are_needed(tmp_path, onnx_by_default):
    torch.manual_seed(0)
    un = PFSAMNet(make_config("litemedsam", "frozen", "unet-h", "gap"))
    d = save_ensemble(tmp_path / "ens", {"unet-h": un}, {"unet-h": 1.0}, {"unet-h": 1.0})
    assert not isinstance(next(iter(Predictor.from_dir(d, device="cpu").members.values())).encoder, OnnxEncoder)
    with pytest.raises(OnnxUnavailable, match="stage features"):
        Predictor.from_dir(d, device="cpu", runtime="onnx")
    assert np.isfinite(Predictor.from_dir(d, device="cpu").predict_one(_images()[0]).mask).all()


_TELEMETRY_CHILD = """
import sys, torch
from torch import nn
from model.onnx_encoder import onnx_encoder

class Enc(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 4, stride=4)
    def forward(self, x):
        return self.conv(x), []

enc = Enc().eval()
ort = onnx_encoder(enc, "tiny", 32)
x = torch.rand(2, 3, 32, 32)
emb, _ = ort(x)
assert torch.allclose(emb, enc(x)[0], atol=1e-5), "ONNX Runtime and PyTorch differ"
print("ran", tuple(emb.shape))
"""


def test_onnx_runtime_writes_no_telemetry_files(tmp_path):
    """ONNX Runtime 1.32's telemetry client writes a device id and an event database under
    ~/.cache/Microsoft (and later looks up its upload endpoint) unless ORT_DISABLE_TELEMETRY is set
    before its import: the product's import sets it. A fresh process, as a user's, without the variable."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), PFSAM_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _TELEMETRY_CHILD], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ran (2, 4, 8, 8)" in out.stdout
    assert len(list((tmp_path / "cache").glob("tiny-32-*.onnx"))) == 1  # the graph went where it should
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert written == [], f"files written under HOME: {written}"


class _TinyEncoder(nn.Module):
    """An encoder as the product's (``forward(x) -> (embedding, stage features)``) whose batch norm and
    dropout give other outputs in training mode than in eval mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 4, stride=4)
        self.norm = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.drop(self.norm(self.conv(x))), []


def test_the_graph_is_the_eval_mode_encoder_and_the_encoder_keeps_its_mode(tmp_path, monkeypatch):
    """Exported from an encoder in either mode, the graph computes the eval-mode embedding (running
    batch-norm statistics, no dropout) for any batch size; the encoder is left in the mode it was in
    (a model being trained stays in training mode, a frozen one in eval mode)."""
    monkeypatch.setenv("PFSAM_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32)
    for training in (True, False):
        enc = _TinyEncoder().train(training)
        ort = onnx_encoder.onnx_encoder(enc, f"tiny{int(training)}", 32)
        assert enc.training is training and enc.norm.training is training and enc.drop.training is training
        emb, feats = ort(x)
        with torch.no_grad():
            expected = _TinyEncoder.forward(enc.eval(), x)[0]
        assert feats == [] and emb.dtype == torch.float32 and emb.shape == (3, 4, 8, 8)
        assert torch.allclose(emb, expected, atol=1e-5), training


def test_the_cache_folder_is_pfsam_cache_else_xdg_cache_home_else_the_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PFSAM_CACHE", str(tmp_path / "pfsam"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "pfsam"
    monkeypatch.setenv("PFSAM_CACHE", "")  # set but empty: as unset
    assert cache_dir() == tmp_path / "xdg" / "pfsam-bus"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert cache_dir() == tmp_path / "home" / ".cache" / "pfsam-bus"


def test_the_session_threads_and_a_telemetry_setting_the_user_made(tmp_path, monkeypatch):
    """ONNX Runtime runs on the threads asked for, else on as many as PyTorch; importing it through
    the product turns its telemetry off unless the user set ORT_DISABLE_TELEMETRY (kept as set)."""
    graph = onnx_encoder.export_bytes(_TinyEncoder().eval(), 32)
    assert OnnxEncoder(graph, threads=3).session.get_session_options().intra_op_num_threads == 3
    assert OnnxEncoder(graph).session.get_session_options().intra_op_num_threads == torch.get_num_threads()
    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "0")
    onnx_encoder.import_onnxruntime()
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "0"
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY")
    onnx_encoder.import_onnxruntime()
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1"


def test_the_cached_graph_is_named_by_the_code_that_runs_the_weights_too(tmp_path, monkeypatch):
    """A graph cached by an earlier release of this package was run by --runtime onnx after an upgrade
    that changed the encoder's code, the weights being the same (the name held their digest alone):
    the old encoder's outputs, with no word. Its name now holds a digest of the package's layer
    sources (and their CODE_FILES) and of torch's version: changed code exports a new graph."""
    import importlib.util

    monkeypatch.setattr(onnx_encoder, "_PACKAGE", tmp_path.resolve())
    monkeypatch.setenv("PFSAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_encoder, "export_bytes", lambda encoder, size: b"graph")
    source = tmp_path / "layers.py"
    helper = tmp_path / "helper.py"
    helper.write_text("SCALE = 1\n")

    def encoder(code: str) -> nn.Module:
        source.write_text("import torch\nCODE_FILES = [__file__.replace('layers.py', 'helper.py')]\n"
                          f"class Enc(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                          f"        self.lin = torch.nn.Linear(2, 2)\n    def forward(self, x):\n        return {code}\n")
        spec = importlib.util.spec_from_file_location("pfsam_test_layers", source)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "pfsam_test_layers", module)
        spec.loader.exec_module(module)
        torch.manual_seed(0)  # the same weights every time
        return module.Enc()

    first = onnx_encoder.onnx_graph(encoder("(self.lin(x), [])"), "enc", 8)
    assert first.is_file() and onnx_encoder.onnx_graph(encoder("(self.lin(x), [])"), "enc", 8) == first
    changed = onnx_encoder.onnx_graph(encoder("(self.lin(x) * 2, [])"), "enc", 8)
    assert changed != first and changed.is_file()
    helper.write_text("SCALE = 2\n")  # a file the layers' module lists as code it runs
    assert onnx_encoder.onnx_graph(encoder("(self.lin(x) * 2, [])"), "enc", 8) not in (first, changed)
    cached = set((tmp_path / "cache").iterdir())
    assert len(cached) == 3
    monkeypatch.setattr(torch, "__version__", "0.0.0+other")
    assert onnx_encoder.onnx_graph(encoder("(self.lin(x) * 2, [])"), "enc", 8) not in cached


def test_compile_with_the_onnx_runtime_is_refused_when_the_predictor_is_built(lite_ensemble):
    """torch.compile wrapped ONNX Runtime's module, and every batch then failed inside dynamo's guards
    ("This is a bug - please create an issue"); the pair is refused with the reason at load."""
    with pytest.raises(ValueError, match="torch.compile runs the encoder in PyTorch: not with runtime 'onnx'"):
        Predictor.from_dir(lite_ensemble, device="cpu", runtime="onnx", compile_backend="inductor")


def test_a_sam_vit_encoder_through_onnx_gives_the_pytorch_embedding(tmp_path, monkeypatch):
    """SAM's ViT rounded its windows' 14 key rows up to 16 with -(-h // 8) * 8, which the ONNX exporter
    divides toward zero (8): every batch of a SAM ViT or MedSAM model with --runtime onnx failed in
    ONNX Runtime's Reshape. A small ViT of the same blocks (windowed and global attention, random
    relative-position tables) through ONNX Runtime gives PyTorch's embedding."""
    from model.encoders.sam_vit import ImageEncoderViT

    monkeypatch.setenv("PFSAM_CACHE", str(tmp_path))
    torch.manual_seed(0)
    enc = ImageEncoderViT(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), img_size=224,
                          out_chans=32).eval()
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0, 0.5)
    ort = onnx_encoder.onnx_encoder(enc, "small_vit", 224)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        want = enc(x)[0]
    got = ort(x)[0]
    assert got.shape == want.shape == (3, 32, 14, 14)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
