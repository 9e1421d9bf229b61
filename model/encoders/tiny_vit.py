"""TinyViT image encoder as used by LiteMedSAM (256x256 input -> 256x64x64 embedding).

Written for this project; its parameter names follow LiteMedSAM's checkpoint so that the
``image_encoder.*`` part of ``lite_medsam.pth`` loads without renaming. Differences from the
published code that do not change results: attention runs through
``F.scaled_dot_product_attention`` with the relative-position bias as an additive mask, the bias
table is gathered on every call (no stale cache after loading weights), ``fuse()`` folds each
BatchNorm into its convolution for inference, and ``use_onednn_postops()`` then runs the
convolutions and linear layers through oneDNN on CPU with each GELU and residual add inside the
layer before it (post-ops: the same erf GELU, without another pass over the activations), and the
attention's output projection after the windows are undone, on the image's tokens only.

LiteMedSAM's variant keeps stage 0 at full input resolution (1x1 patch embedding), halves it in
stages 1 and 2 and keeps stage 3 at 1/4: for 256 input the stages run at 256, 128, 64, 64.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d

# what else this encoder's output depends on (the embedding cache's key hashes these files too)
CODE_FILES = (Path(__file__).with_name("common.py"),)


@functools.lru_cache(maxsize=None)
def onednn_postops_available() -> bool:
    """Whether this torch has oneDNN's fused convolution and linear ops (``torch.ops.mkldnn``,
    what inductor's CPU backend calls) and they give conv/linear + exact GELU, and linear + add,
    here."""
    g = torch.Generator().manual_seed(0)  # its own generator: the probe leaves the global RNG alone
    try:
        x = torch.randn(1, 4, 5, 5, generator=g)
        w, b = torch.randn(4, 4, 1, 1, generator=g), torch.randn(4, generator=g)
        conv = torch.ops.mkldnn._convolution_pointwise(x, w, b, [0, 0], [1, 1], [1, 1], 1, "gelu", [], "none")
        t = x[0].permute(1, 2, 0)  # (5, 5, 4): tokens, as Mlp gives them
        lin = torch.ops.mkldnn._linear_pointwise(t, w[:, :, 0, 0], b, "gelu", [], "none")
        add = torch.ops.mkldnn._linear_pointwise.binary(t, t, w[:, :, 0, 0], b, "add")
        return (torch.allclose(conv, F.gelu(F.conv2d(x, w, b)), atol=1e-5)
                and torch.allclose(lin, F.gelu(F.linear(t, w[:, :, 0, 0], b)), atol=1e-5)
                and torch.allclose(add, F.linear(t, w[:, :, 0, 0], b) + t, atol=1e-5))
    except (AttributeError, RuntimeError):
        return False


def _onednn(x: torch.Tensor) -> bool:
    """The fused ops run fp32 CPU inference only: no autograd, no autocast (they follow neither),
    no tracing (an exported graph keeps the standard ops)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing())


def _conv_gelu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, list(conv.padding),
                                                   list(conv.stride), list(conv.dilation), conv.groups,
                                                   "gelu", [], "none")


def _linear(lin: nn.Linear, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """lin(x), and its GELU if asked, in one oneDNN call (faster than ``addmm`` for these shapes even
    without the GELU: ``addmm`` first copies the bias into every output row)."""
    return torch.ops.mkldnn._linear_pointwise(x, lin.weight, lin.bias, "gelu" if gelu else "none", [], "none")


def _linear_add(lin: nn.Linear, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """lin(x) + other in one oneDNN call."""
    return torch.ops.mkldnn._linear_pointwise.binary(x.contiguous(), other.contiguous(), lin.weight, lin.bias, "add")


def _conv_add(conv: nn.Conv2d, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """conv(x) + other in one oneDNN call (its GELU post-op does not combine with a sum)."""
    return torch.ops.mkldnn._convolution_pointwise.binary(x, other, conv.weight, conv.bias, list(conv.padding),
                                                          list(conv.stride), list(conv.dilation), conv.groups,
                                                          "add", 1.0, None, [], None)


class Conv2dBN(nn.Sequential):
    """Convolution without bias followed by BatchNorm (keys ``c.*`` and ``bn.*``)."""

    def __init__(self, cin: int, cout: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, ks, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))

    @torch.no_grad()
    def fused(self) -> nn.Conv2d:
        c, bn = self.c, self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                         groups=c.groups, bias=True).to(c.weight.device)
        conv.weight.copy_(c.weight * scale[:, None, None, None])
        conv.bias.copy_(bn.bias - bn.running_mean * scale)
        return conv


class PatchEmbed(nn.Module):
    onednn = False  # set by TinyViT.use_onednn_postops

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.seq = nn.Sequential(Conv2dBN(in_chans, dim // 2), nn.GELU(), Conv2dBN(dim // 2, dim))

    def forward(self, x):
        if self.onednn and _onednn(x):
            return self.seq[2](_conv_gelu(self.seq[0], x))
        return self.seq(x)


class MBConv(nn.Module):
    onednn = False

    def __init__(self, dim: int, expand: float):
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim)

    def forward(self, x):
        if self.onednn and _onednn(x):
            return F.gelu(_conv_add(self.conv3, _conv_gelu(self.conv2, _conv_gelu(self.conv1, x)), x))
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Channel change plus a strided depthwise conv; stride 1 into the last stage (LiteMedSAM)."""

    onednn = False

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x):  # B,C,H,W -> B,C',H',W'
        if self.onednn and _onednn(x):
            return self.conv3(_conv_gelu(self.conv2, _conv_gelu(self.conv1, x)))
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.conv3(x)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # TinyViT's attention bias per head and |row offset|, |column offset| of a query-key pair, in
        # the order the original numbers them (first appearance, scanning queries then keys in raster
        # order: offset (dy, dx) is number dy * window + dx); built without Python loops (start-up)
        r = torch.arange(window).repeat_interleave(window)
        c = torch.arange(window).repeat(window)
        idxs = (r[:, None] - r).abs() * window + (c[:, None] - c).abs()
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("attention_bias_idxs", idxs, persistent=False)

    def forward(self, x):  # (B, N, C)
        return self.proj(self.mix(x))

    def mix(self, x: torch.Tensor, onednn: bool = False) -> torch.Tensor:
        """Everything before the output projection: (B, N, C) -> (B, N, C)."""
        b, n, _ = x.shape
        x = self.norm(x)
        qkv = _linear(self.qkv, x) if onednn else self.qkv(x)
        q, k, v = qkv.view(b, n, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)[None]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return x.transpose(1, 2).reshape(b, n, -1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))

    def add_onednn(self, x: torch.Tensor) -> torch.Tensor:
        """x + self(x) through oneDNN: GELU inside the first product, the residual inside the second."""
        return _linear_add(self.fc2, _linear(self.fc1, self.norm(x), gelu=True), x)


class TinyViTBlock(nn.Module):
    onednn = False

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float):
        super().__init__()
        self.window = window
        self.attn = Attention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, 3, 1, 1, groups=dim)

    def _windows(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B * windows, ws * ws, C), zero-padded to whole windows."""
        b, h, w, c = t.shape
        ws = self.window
        pb, pr = (ws - h % ws) % ws, (ws - w % ws) % ws
        if pb or pr:
            t = F.pad(t, (0, 0, 0, pr, 0, pb))
        return t.reshape(b, (h + pb) // ws, ws, (w + pr) // ws, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)

    def _unwindow(self, t: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The inverse of ``_windows``, padding cropped: -> (B, H, W, C), a view where cropped."""
        ws, c = self.window, t.shape[-1]
        nh, nw = (h + ws - 1) // ws, (w + ws - 1) // ws  # not -(-h // ws): ONNX divides toward zero
        return t.view(-1, nh, nw, ws, ws, c).transpose(2, 3).reshape(-1, nh * ws, nw * ws, c)[:, :h, :w]

    def forward(self, x):  # B,C,H,W
        h, w = x.shape[-2:]
        t = x.permute(0, 2, 3, 1)
        if self.onednn and _onednn(x):
            # the output projection runs per token, so it runs after the windows are undone, on the
            # image's tokens only (not the padding), with the residual add inside it
            t = _linear_add(self.attn.proj, self._unwindow(self.attn.mix(self._windows(t), onednn=True), h, w), t)
            t = self.local_conv(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            return self.mlp.add_onednn(t).permute(0, 3, 1, 2)
        t = self._unwindow(self.attn(self._windows(t)), h, w)
        x = x + t.permute(0, 3, 1, 2)
        x = self.local_conv(x)
        t = x.permute(0, 2, 3, 1)
        t = t + self.mlp(t)
        return t.permute(0, 3, 1, 2)


class Stage(nn.Module):
    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """Returns the neck embedding and the outputs of stages 0..n-2 (B,C,H,W) as skip features."""

    def __init__(self, in_chans=3, embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2),
                 num_heads=(2, 4, 5, 10), window_sizes=(7, 7, 14, 7), mlp_ratio=4.0,
                 mbconv_expand_ratio=4.0, out_chans=256):
        super().__init__()
        self.embed_dims = tuple(embed_dims)
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        layers = []
        n = len(depths)
        for i in range(n):
            down = None
            if i < n - 1:
                stride = 1 if i == n - 2 else 2
                down = PatchMerging(embed_dims[i], embed_dims[i + 1], stride)
            if i == 0:
                blocks = [MBConv(embed_dims[0], mbconv_expand_ratio) for _ in range(depths[0])]
            else:
                blocks = [TinyViTBlock(embed_dims[i], num_heads[i], window_sizes[i], mlp_ratio)
                          for _ in range(depths[i])]
            layers.append(Stage(blocks, down))
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, 1, bias=False), LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans),
        )

    def skip_channels(self) -> list[int]:
        """Channels of the skip features: the outputs of stages 0..n-2 (after downsampling)."""
        return list(self.embed_dims[1:])[: len(self.layers) - 1]

    def skip_scales(self) -> list[int]:
        """Resolution of each skip relative to the embedding grid (stage 0 output is at 2x)."""
        return [2] + [1] * (len(self.layers) - 2)

    def forward(self, x):
        x = self.patch_embed(x)
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return self.neck(x), feats[:-1]

    @torch.no_grad()
    def fuse(self) -> "TinyViT":
        """Fold every BatchNorm into its conv (inference only; the result cannot be trained)."""
        for name, mod in list(self.named_modules()):
            for cname, child in list(mod.named_children()):
                if isinstance(child, Conv2dBN):
                    setattr(mod, cname, child.fused())
        return self

    @property
    def onednn_postops(self) -> bool:
        """Whether ``use_onednn_postops`` is on."""
        return self.patch_embed.onednn

    def use_onednn_postops(self, on: bool = True) -> bool:
        """In fp32 CPU inference, run every linear layer through oneDNN instead of ``addmm`` (which
        first copies the bias into each output row), each GELU as a post-op of the convolution or
        linear layer before it, and the residual adds of MBConv and of the TinyViT blocks inside
        the layer before them; the attention's output projection runs after the windows are undone,
        on the image's tokens only. Elsewhere (autograd, autocast, tracing) the plain path runs.
        The values are those of the plain path to within float rounding; the GELUs saved about 12 %
        of the encoder's time on CPU (session 17) and the linear layers about 7 % more (session 18).
        Needs ``fuse()`` first. Returns whether it is on (off where this torch lacks the ops)."""
        if on and any(isinstance(m, Conv2dBN) for m in self.modules()):
            raise ValueError("use_onednn_postops needs the BatchNorm-folded encoder: call fuse() first")
        on = bool(on) and onednn_postops_available()
        for m in self.modules():
            if isinstance(m, (PatchEmbed, MBConv, PatchMerging, TinyViTBlock)):
                m.onednn = on
        return on


def build_litemedsam_tinyvit() -> TinyViT:
    return TinyViT()
