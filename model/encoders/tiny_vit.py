"""TinyViT image encoder as used by LiteMedSAM (256x256 input -> 256x64x64 embedding).

Written for this project; its parameter names follow LiteMedSAM's checkpoint so that the
``image_encoder.*`` part of ``lite_medsam.pth`` loads without renaming. Differences from the
published code that do not change results: attention runs through
``F.scaled_dot_product_attention`` with the relative-position bias as an additive mask, the bias
table is gathered on every call (no stale cache after loading weights), and ``fuse()`` folds each
BatchNorm into its convolution for inference.

LiteMedSAM's variant keeps stage 0 at full input resolution (1x1 patch embedding), halves it in
stages 1 and 2 and keeps stage 3 at 1/4: for 256 input the stages run at 256, 128, 64, 64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d


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
    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.seq = nn.Sequential(Conv2dBN(in_chans, dim // 2), nn.GELU(), Conv2dBN(dim // 2, dim))

    def forward(self, x):
        return self.seq(x)


class MBConv(nn.Module):
    def __init__(self, dim: int, expand: float):
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim)

    def forward(self, x):
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Channel change plus a strided depthwise conv; stride 1 into the last stage (LiteMedSAM)."""

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x):  # B,C,H,W -> B,C',H',W'
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
        b, n, _ = x.shape
        x = self.norm(x)
        q, k, v = self.qkv(x).view(b, n, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)[None]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float):
        super().__init__()
        self.window = window
        self.attn = Attention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x):  # B,C,H,W
        b, c, h, w = x.shape
        ws = self.window
        t = x.permute(0, 2, 3, 1)
        pb, pr = (ws - h % ws) % ws, (ws - w % ws) % ws
        if pb or pr:
            t = F.pad(t, (0, 0, 0, pr, 0, pb))
        ph, pw = h + pb, w + pr
        t = t.reshape(b, ph // ws, ws, pw // ws, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)
        t = self.attn(t)
        t = t.view(b, ph // ws, pw // ws, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)[:, :h, :w]
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


def build_litemedsam_tinyvit() -> TinyViT:
    return TinyViT()
