"""The network's structure (model/network.py, model/encoders/): each SAM encoder is the architecture
of its official checkpoint, the ViT's skip features are the blocks UNet-H was trained on, the
fused attention kernel is never asked for gradients, MGC-A is guided by the model's own mask
probability without passing gradients back to the segmentation head, and a frozen encoder stays
frozen (no gradients, no BatchNorm statistics updated) while the heads train."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.encoders import ENCODERS, get_spec
from model.encoders.weights import KNOWN_CHECKPOINTS
from model.network import PFSAMNet, make_config

# segment-anything's build_sam: embed_dim, depth, heads, global attention blocks of each image encoder
SAM_VITS = {"vit_b": (768, 12, 12, [2, 5, 8, 11]), "vit_l": (1024, 24, 16, [5, 11, 17, 23]),
            "vit_h": (1280, 32, 16, [7, 15, 23, 31])}


@pytest.mark.parametrize("name, variant, checkpoint, normalization", [
    ("sam_vit_b", "vit_b", "sam_vit_b_01ec64.pth", "sam"), ("sam_vit_l", "vit_l", "sam_vit_l_0b3195.pth", "sam"),
    ("sam_vit_h", "vit_h", "sam_vit_h_4b8939.pth", "sam"), ("medsam_vit_b", "vit_b", "medsam_vit_b.pth", "minmax")])
def test_each_sam_encoder_is_the_architecture_of_its_official_checkpoint(name, variant, checkpoint, normalization):
    """Every ``image_encoder.*`` tensor of segment-anything's model of that variant has a tensor of
    the same name and shape here and vice versa, so the official file (the one the spec names, whose
    download the error messages give) loads strictly; the window/global blocks are SAM's, and the
    UNet-H skips are the outputs of the first three global blocks. SAM takes SAM's pixel mean/std,
    MedSAM the min-max normalisation it was trained with. (Built on the meta device: no memory, no time.)"""
    sam = pytest.importorskip("segment_anything")
    spec = get_spec(name)
    with torch.device("meta"):
        ours = spec.build(spec.input_size)
        ref = sam.sam_model_registry[variant]().image_encoder
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    dim, depth, heads, global_blocks = SAM_VITS[variant]
    assert ours.embed_dim == dim and len(ours.blocks) == depth and ours.blocks[0].attn.num_heads == heads
    assert [i for i, b in enumerate(ours.blocks) if b.window_size == 0] == global_blocks
    assert all(b.window_size == 14 for i, b in enumerate(ours.blocks) if i not in global_blocks)
    assert list(ours.feature_blocks) == global_blocks[:3]
    assert spec.default_checkpoint == checkpoint and spec.normalization == normalization
    if name.startswith("sam_"):
        assert KNOWN_CHECKPOINTS[checkpoint][1].endswith("/" + checkpoint)


def test_the_package_encoder_takes_minmax_input_at_256():
    """LiteMedSAM (the shipped model's encoder) was trained on 256 x 256 min-max normalised images."""
    assert ENCODERS["litemedsam"].input_size == 256 and ENCODERS["litemedsam"].normalization == "minmax"


def test_vit_skip_features_are_the_token_maps_after_their_blocks():
    """``forward`` returns the neck's embedding and, for UNet-H, each feature block's output as a
    B x C x H x W map: the tensors a hook on those blocks sees, in block order."""
    from model.encoders.sam_vit import ImageEncoderViT

    torch.manual_seed(0)
    enc = ImageEncoderViT(embed_dim=32, depth=6, num_heads=2, global_attn_indexes=(1, 3, 4, 5), img_size=64,
                          window_size=3).eval()
    seen = {}
    for i, block in enumerate(enc.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, out))
    with torch.no_grad():
        emb, feats = enc(torch.randn(2, 3, 64, 64))
    assert enc.feature_blocks == (1, 3, 4) and emb.shape == (2, 256, 4, 4)
    assert len(feats) == 3
    for f, i in zip(feats, enc.feature_blocks):
        assert torch.equal(f, seen[i].permute(0, 3, 1, 2))
    assert torch.equal(emb, enc.neck(seen[5].permute(0, 3, 1, 2)))


def test_the_fused_kernel_runs_only_where_no_gradient_is_wanted(monkeypatch):
    """The fused kernels have no backward. Without gradients the ``fused`` form calls them (here a
    stand-in computing the same function); fine-tuning a SAM ViT (gradients on) takes the other
    forms, whose gradients reach the relative-position tables, instead of a backward that fails."""
    from model.encoders import relpos_attention
    from model.encoders.sam_vit import Attention

    calls = []

    def stand_in(q, k, v, eh, ew, scale):  # softmax(scale q k^T + eh[row(j)] + ew[col(j)]) v, as (B, N, heads, D)
        calls.append(q.requires_grad)
        b, heads, n, _ = q.shape
        bias = (eh[..., :, None] + ew[..., None, :]).reshape(b, heads, n, n)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale).transpose(1, 2)

    monkeypatch.setattr(relpos_attention, "supported", lambda q, gh, gw: True)
    monkeypatch.setattr(relpos_attention, "relpos_attention", stand_in)
    torch.manual_seed(0)
    attn = Attention(32, 2, (6, 6))
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    x = torch.randn(2, 6, 6, 32)
    attn.impl = "bias"
    ref = attn(x)
    attn.impl = "fused"
    with torch.no_grad():
        fused = attn(x)
    assert calls == [False] and torch.allclose(fused, ref, atol=1e-5)
    out = attn(x)  # gradients on: not the kernel
    out.square().sum().backward()
    assert calls == [False] and torch.allclose(out, ref, atol=1e-5)
    assert attn.rel_pos_h.grad is not None and attn.rel_pos_h.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def mgca_net() -> PFSAMNet:
    torch.manual_seed(0)
    return PFSAMNet(make_config("litemedsam", "frozen", "sd-h", "mgc-a", encoder_weights={"source": "random"}),
                    encoder_weights="random").eval()


def test_mgca_is_guided_by_the_predicted_mask_probability_and_passes_no_gradient_back(mgca_net):
    """Without a guide mask, MGC-A pools with the model's own mask *probability* (sigmoid of the
    segmentation logits), detached: the classification loss must not train the segmentation head
    (the method's design; the curriculum's ground-truth masks would otherwise differ in kind from
    the predicted ones). A guide function (the training curriculum) gets the logits and its mask is used."""
    net = mgca_net
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 256, 16, 16, generator=g)
    out = net.heads(emb)
    seg = net.seg_head(emb)
    expected = net.cls_head(emb, torch.sigmoid(seg))
    assert torch.allclose(out["class_logits"], expected, atol=1e-5)
    assert not torch.allclose(out["class_logits"], net.cls_head(emb, seg.clamp(0, 1)), atol=1e-4)
    net.zero_grad()
    out["class_logits"].square().sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in net.seg_head.parameters())
    assert any(p.grad is not None and p.grad.any() for p in net.cls_head.parameters())
    gt = torch.zeros(2, 1, 64, 64)
    gt[:, :, 20:40, 16:44] = 1
    given = []
    guided = net.heads(emb, guide_mask=lambda logits: given.append(logits) or gt)
    assert len(given) == 1 and torch.equal(given[0], guided["mask_logits"])
    assert torch.allclose(guided["class_logits"], net.cls_head(emb, gt), atol=1e-5)


def test_a_frozen_encoder_stays_frozen_while_the_heads_train(mgca_net):
    """``net.train()`` (every training epoch) puts the heads in training mode but keeps a frozen
    encoder in eval mode: LiteMedSAM's BatchNorms would otherwise normalise with batch statistics
    and overwrite their running statistics, changing the embeddings the heads learn from. Its
    parameters take no gradients (nothing for an optimiser or DDP to reduce)."""
    net = mgca_net
    bns = [m for m in net.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    before = [bn.running_mean.clone() for bn in bns]
    with torch.no_grad():
        ref = net.encode(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)))[0]
    try:
        net.train()
        assert net.seg_head.training and net.cls_head.training
        assert not any(m.training for m in net.encoder.modules())
        assert not any(p.requires_grad for p in net.encoder.parameters())
        emb = net.encode(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)))[0]
    finally:
        net.eval()
    assert torch.equal(emb, ref)
    assert all(torch.equal(bn.running_mean, b) for bn, b in zip(bns, before))


@pytest.mark.parametrize("module_name", ["model.encoders.sam_vit", "model.encoders.tiny_vit"])
def test_the_embedding_cache_key_covers_every_encoder_file_the_encoder_runs(module_name):
    """training.cache keys cached embeddings by the encoder module's source and the files its
    ``CODE_FILES`` lists. Every model/encoders file it imports, directly or through those files,
    must be among them: an edit there (LayerNorm2d in common.py, which both encoders' necks run; the
    fused kernel in relpos_kernel.py) would otherwise keep serving embeddings the edited code no
    longer computes, and the heads would train on them."""
    import ast
    import importlib
    from pathlib import Path

    module = importlib.import_module(module_name)
    package = Path(module.__file__).resolve().parent
    covered = {Path(module.__file__).resolve(), *(Path(p).resolve() for p in getattr(module, "CODE_FILES", ()))}
    for path in sorted(covered):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # this package's files (``from .x import``)
                for name in [node.module] if node.module else [a.name for a in node.names]:
                    imported = package / f"{name}.py"
                    assert imported.resolve() in covered, f"{path.name} imports {imported.name}, not in CODE_FILES"


def test_a_config_with_another_encoder_mode_or_class_order_is_refused():
    """A model config is refused when its encoder mode is neither ``frozen`` nor ``finetuned`` (a
    typo would build a fine-tuned model: its encoder trained, no longer shareable) or its classes
    are not (normal, benign, malignant) in that order (the class head's outputs would be read
    under the wrong names)."""
    from model.network import validate_config

    good = make_config("litemedsam", "frozen", "sd-h", "mgc-a", encoder_weights={"source": "random"})
    assert validate_config(good) == good
    with pytest.raises(ValueError, match=r"encoder mode must be one of \('frozen', 'finetuned'\), not 'frozn'"):
        make_config("litemedsam", "frozn")
    swapped = dict(good, class_names=["benign", "malignant", "normal"])
    with pytest.raises(ValueError, match=r"class_names must be \['normal', 'benign', 'malignant'\]"):
        validate_config(swapped)


@pytest.mark.parametrize("impl", ["bias", "augment"])
def test_a_small_sam_encoder_with_every_parameter_random_matches_segment_anything(impl, monkeypatch):
    """segment-anything's ImageEncoderViT and ours, every tensor drawn at random (a fresh model's
    LayerNorms are all ones and zeros, so a block normalising its MLP input with ``norm1`` instead
    of ``norm2``, or the neck's LayerNorm2d mixing scale and shift, would pass a comparison of fresh
    models and still change every embedding of a real checkpoint), on a grid the windows do not
    divide (padding) with a global block last: the same embedding."""
    from functools import partial

    sa = pytest.importorskip("segment_anything.modeling.image_encoder")
    from model.encoders.sam_vit import Attention, ImageEncoderViT

    monkeypatch.setattr(Attention, "impl", impl)
    torch.manual_seed(0)
    kw = dict(img_size=96, embed_dim=64, depth=3, num_heads=4, out_chans=32, window_size=4)
    ref = sa.ImageEncoderViT(patch_size=16, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                             qkv_bias=True, use_rel_pos=True, global_attn_indexes=[2], **kw).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 1 else 0.2) + (1.0 if p.ndim == 1 else 0.0))
    ours = ImageEncoderViT(global_attn_indexes=(2,), **kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        a, _ = ours(x)
        b = ref(x)
    assert a.shape == (2, 32, 6, 6)
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
