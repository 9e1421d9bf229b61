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
    """model/heads/layout.py's GroupNorm: with gradients on a channels-last CPU input it runs the NCHW
    kernel (faster) and returns channels-last; values and gradients are nn.GroupNorm's, in fp32 and
    in bf16 autocast; without gradients it is nn.GroupNorm's own call, bit for bit."""
    from model.heads.layout import GroupNorm

    torch.manual_seed(0)
    ours, ref = GroupNorm(4, 16), torch.nn.GroupNorm(4, 16)
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
    assert kernel_inputs_nchw == [True, False]  # ours gives the kernel NCHW, nn.GroupNorm channels-last
    assert outs[0].is_contiguous(memory_format=torch.channels_last)
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-4, "atol": 1e-4}  # summation order
    torch.testing.assert_close(outs[0].float(), outs[1].float(), **tol)
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
