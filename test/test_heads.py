"""The heads compute what the method describes, in whatever order and layout they run fastest:
SD-H against the textbook order (1x1 output convolution after the last upsampling), the
classifiers against a 1x1 convolution and elementwise mask-weighted means, on NCHW and
channels-last inputs, with the same parameter names and shapes as before (stored checkpoints load)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.heads import GAPClassifier, MGCAClassifier, SDHead


def sd_head_textbook(head: SDHead, embedding: torch.Tensor) -> torch.Tensor:
    x = head.drop(embedding)
    for block in head.blocks:
        x = F.interpolate(block(x), scale_factor=2, mode="bilinear", align_corners=False)
    return head.out(x)


def mgca_textbook(head: MGCAClassifier, embedding: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    f = head.adapt(embedding)
    m = F.interpolate(mask, size=f.shape[-2:], mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    fg = (f * m).sum((2, 3)) / (m.sum((2, 3)) + 1e-6)
    bg = (f * (1 - m)).sum((2, 3)) / ((1 - m).sum((2, 3)) + 1e-6)
    return head.mlp(torch.cat([fg, bg, m.mean((2, 3))], 1))


def _inputs(channels_last: bool):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(3, 32, 16, 16, generator=g)
    # a lesion-like mask: a disc of varying size, soft at its edge, one image without lesion
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    r = torch.tensor([12.0, 25.0, 0.0])[:, None, None]
    mask = torch.sigmoid((r - ((yy - 30) ** 2 + (xx - 34) ** 2).sqrt()) / 2)[:, None]
    mask[2] = 0
    return (emb.contiguous(memory_format=torch.channels_last) if channels_last else emb), mask


@pytest.mark.parametrize("channels_last", [False, True])
def test_sd_head_equals_the_textbook_order(channels_last):
    torch.manual_seed(0)
    head = SDHead(embed_dim=32, channels=(16, 8)).eval()
    emb, _ = _inputs(channels_last)
    with torch.no_grad():
        ours, ref = head(emb), sd_head_textbook(head, emb)
    assert ours.shape == (3, 1, 64, 64)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_mgca_equals_conv_and_masked_means_with_the_same_gradients(channels_last):
    torch.manual_seed(0)
    head = MGCAClassifier(embed_dim=32, hidden=16).eval()
    emb, mask = _inputs(channels_last)
    ours = head(emb, mask)
    g_ours = torch.autograd.grad(ours.square().sum(), list(head.parameters()))
    ref = mgca_textbook(head, emb, mask)
    g_ref = torch.autograd.grad(ref.square().sum(), list(head.parameters()))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the mask matters: another mask gives other logits
    assert not torch.allclose(head(emb, mask.flip(0)), ours, atol=1e-4)


def test_gap_equals_conv_and_global_mean():
    torch.manual_seed(0)
    head = GAPClassifier(embed_dim=32, hidden=16).eval()
    emb, _ = _inputs(True)
    with torch.no_grad():
        torch.testing.assert_close(head(emb), head.mlp(head.adapt(emb).mean((2, 3))), rtol=1e-5, atol=1e-5)


def test_classifier_parameters_keep_their_stored_names_and_shapes():
    shapes = {k: tuple(v.shape) for k, v in MGCAClassifier(embed_dim=256).state_dict().items()}
    assert shapes["adapt.0.weight"] == (256, 256, 1, 1) and shapes["adapt.0.bias"] == (256,)
    assert shapes["mlp.1.weight"] == (256, 2 * 256 + 1)


@pytest.mark.parametrize("autocast", [False, True])
def test_group_norm_trains_in_nchw_on_cpu_with_the_same_values_and_gradients(autocast, monkeypatch):
    """model/heads/layout.py's GroupNorm with ``nchw_training``: with gradients on a channels-last
    bf16 CPU input it runs the NCHW kernel (faster there) and returns channels-last; an fp32 input
    goes to nn.GroupNorm's own channels-last kernel (faster in fp32); values and gradients are
    nn.GroupNorm's either way; without gradients it is nn.GroupNorm's own call, bit for bit."""
    from model.heads.layout import GroupNorm

    torch.manual_seed(0)
    ours, ref = GroupNorm(4, 16, nchw_training=True), torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    x = (torch.randn(3, 16, 20, 20) * 3 + 1).contiguous(memory_format=torch.channels_last)
    kernel_inputs_nchw, group_norm = [], F.group_norm  # the layout each module hands the kernel

    def recording(inp, *args, **kwargs):
        kernel_inputs_nchw.append(inp.is_contiguous())
        return group_norm(inp, *args, **kwargs)

    monkeypatch.setattr(F, "group_norm", recording)
    outs, grads = [], []
    for m in (ours, ref):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(xi.to(torch.bfloat16) if autocast else xi)
        outs.append(y)
        grads.append(torch.autograd.grad((y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(),
                                         [xi, m.weight, m.bias]))
    # in bf16 ours gives the kernel NCHW, nn.GroupNorm channels-last; in fp32 both channels-last
    assert kernel_inputs_nchw == ([True, False] if autocast else [False, False])
    assert outs[0].is_contiguous(memory_format=torch.channels_last)
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-4, "atol": 1e-4}  # summation order
    torch.testing.assert_close(outs[0].float(), outs[1].float(), **tol)
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


def test_each_head_chooses_its_group_norms_training_layout(monkeypatch):
    """SD-H's norms take the NCHW round trip in bf16 training (faster in that head), UNet-H's never
    (its own kernel is faster there): a bf16 training step hands the kernel the layouts so chosen."""
    from model.heads.layout import GroupNorm
    from model.heads.sd_head import SDHead
    from model.heads.unet_head import UNetHead

    torch.manual_seed(0)
    sd = SDHead(16, (8, 8)).to(memory_format=torch.channels_last)
    unet = UNetHead(16, [8, 8, 8], [2, 1, 1], channels=(8, 8, 8), skip_dim=8).to(memory_format=torch.channels_last)
    assert {m.nchw_training for m in sd.modules() if isinstance(m, GroupNorm)} == {True}
    assert {m.nchw_training for m in unet.modules() if isinstance(m, GroupNorm)} == {False}
    cl = lambda *s: torch.randn(*s).contiguous(memory_format=torch.channels_last)  # noqa: E731
    emb = cl(2, 16, 8, 8)
    group_norm = F.group_norm
    for head, args, nchw in ((sd, (emb,), True), (unet, (emb, [cl(2, 8, 16, 16), cl(2, 8, 8, 8), cl(2, 8, 8, 8)]), False)):
        seen = []

        def recording(inp, *a, **k):
            seen.append(inp.is_contiguous())
            return group_norm(inp, *a, **k)

        monkeypatch.setattr(F, "group_norm", recording)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            head(*args).float().sum().backward()
        assert seen and set(seen) == {nchw}


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_up_conv_equals_the_transposed_convolution_with_the_same_gradients(autocast, channels_last, monkeypatch):
    """UNet-H's UpConv2x2 training on CPU (a 1x1 convolution to 4 x cout channels, then pixel_shuffle)
    computes nn.ConvTranspose2d(cin, cout, 2, stride=2) with the same weights, in fp32 and in bf16
    autocast, with the same gradients, and keeps its parameter names and shapes (stored UNet-H heads
    load); without gradients it is the transposed convolution's own call, bit for bit."""
    from model.upconv import UpConv2x2

    torch.manual_seed(0)
    ours, ref = UpConv2x2(6, 5), torch.nn.ConvTranspose2d(6, 5, 2, stride=2)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, 7, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.linspace(-0.5, 1.5, 2 * 5 * 14 * 18).view(2, 5, 14, 18)
    outs, grads = [], []
    for m in (ours, ref):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(xi)
        outs.append(y)
        grads.append(torch.autograd.grad((y.float() * weight).sum(), [xi, m.weight, m.bias]))
    assert outs[0].shape == (2, 5, 14, 18) and outs[0].dtype == outs[1].dtype
    # each output pixel is one input pixel through one of the four kernel taps: a changed tap moves
    # exactly a quarter of the outputs, those at (odd row, even column) (the training form: gradients on)
    probe = UpConv2x2(6, 5)
    probe.load_state_dict(ours.state_dict())
    with torch.no_grad():
        probe.weight[:, :, 1, 0] += 1
    moved = (probe(x) != ours(x)).any(1)
    assert moved.float().mean().item() == pytest.approx(0.25) and moved[:, 1::2, 0::2].all()
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(outs[0].float(), outs[1].float(), **tol)
    for a, b in zip(*grads):  # sums over up to 504 products: the summation order shows in fp32 too
        torch.testing.assert_close(a.float(), b.float(), **(tol if autocast else {"rtol": 1e-4, "atol": 1e-4}))
    # which form ran: the two agree bit for bit on these shapes, so the outputs cannot tell
    shuffles, pixel_shuffle = [], F.pixel_shuffle
    monkeypatch.setattr(F, "pixel_shuffle", lambda *a, **k: shuffles.append(1) or pixel_shuffle(*a, **k))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert torch.equal(ours(x), ref(x)) and shuffles == []
    ours(x)
    assert shuffles == [1]  # with gradients on, the conv form


def unet_head_textbook(head, embedding, features):
    """UNet-H as its docstring draws it: transposed convolutions and concatenated skips."""
    def up(m, x):
        return F.conv_transpose2d(x, m.weight, m.bias, stride=2)

    def adapter(a, x):
        for m in a.seq:
            x = up(m, x) if isinstance(m, torch.nn.ConvTranspose2d) else m(x)
        return x

    s0, s1, s2 = (adapter(a, f) for a, f in zip(head.skips, features))
    x = head.level0(torch.cat([embedding, s2], 1))
    x = head.level1(torch.cat([up(head.up1, x), s1], 1))
    x = head.level2(torch.cat([up(head.up2, x), s0], 1))
    return head.out(x)


@pytest.mark.parametrize("channels_last", [False, True])
def test_unet_head_equals_transposed_convolutions_on_concatenated_skips(channels_last):
    """UNet-H on CPU (UpConv2x2, the level convolutions split over their input channels) against the
    textbook graph, with the same gradients, on the shapes of LiteMedSAM's stages scaled down
    (stage 0 at twice the embedding grid)."""
    from model.heads.unet_head import UNetHead

    torch.manual_seed(0)
    head = UNetHead(embed_dim=24, skip_channels=[12, 16, 20], skip_scales=[2, 1, 1], channels=(16, 16, 8), skip_dim=8)
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 24, 8, 8, generator=g)
    feats = [torch.randn(2, 12, 16, 16, generator=g), torch.randn(2, 16, 8, 8, generator=g),
             torch.randn(2, 20, 8, 8, generator=g)]
    if channels_last:
        head = head.to(memory_format=torch.channels_last)
        emb, feats = emb.contiguous(memory_format=torch.channels_last), [
            f.contiguous(memory_format=torch.channels_last) for f in feats]
    weight = torch.linspace(-0.5, 1.5, 2 * 32 * 32).view(2, 1, 32, 32)
    outs, grads = [], []
    for fn in (head, lambda e, f: unet_head_textbook(head, e, f)):
        inputs = [t.clone().requires_grad_(True) for t in [emb, *feats]]
        y = fn(inputs[0], inputs[1:])
        outs.append(y)
        grads.append(torch.autograd.grad((y * weight).sum(), [*inputs, *head.parameters()]))
    assert outs[0].shape == (2, 1, 32, 32)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # every skip reaches the mask
    assert all(gr.abs().sum() > 0 for gr in grads[0][:4])


def test_the_norm_settings_that_checkpoints_do_not_store_are_the_trained_ones():
    """A checkpoint stores the norms' scales and shifts, not their group counts or eps: every trained
    SD-H, UNet-H, MGC-A and GAP head was trained with GroupNorms of min(8, channels) groups and
    eps 1e-5 and the classifiers' LayerNorm at eps 1e-5. Another value would load every stored model
    without a complaint and change its masks and classes (test_default_model compares the shipped
    ensemble's answer with the recorded one; no shipped model has a UNet-H)."""
    from model.heads.unet_head import UNetHead

    heads = [SDHead(), UNetHead(skip_channels=[768] * 3, skip_scales=[1] * 3),
             UNetHead(embed_dim=256, skip_channels=[64, 128, 160], skip_scales=[4, 1, 1], channels=(128, 64, 4)),
             MGCAClassifier(), GAPClassifier()]
    group_norms = layer_norms = 0
    for head in heads:
        for m in head.modules():
            if isinstance(m, torch.nn.GroupNorm):
                assert (m.num_groups, m.eps) == (min(8, m.num_channels), 1e-5), (type(head).__name__, m)
                group_norms += 1
            elif isinstance(m, torch.nn.LayerNorm):
                assert m.eps == 1e-5, (type(head).__name__, m)
                layer_norms += 1
    assert group_norms == 2 + 9 + 7 and layer_norms == 2  # SD-H; UNet-H with ViT, with TinyViT skips
