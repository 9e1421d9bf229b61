"""SAM's ViT image encoder (ViT-B/L/H, 1024x1024 input -> 256x64x64 embedding).

Written for this project with the parameter names of segment-anything's ``ImageEncoderViT``, so
the ``image_encoder.*`` part of an official SAM or MedSAM checkpoint loads as it is. SAM's
decomposed relative-position terms are computed once per block and enter a fused attention kernel
in one of three forms (``Attention``): an additive mask or q/k augmented for PyTorch's
``scaled_dot_product_attention``, or this project's Triton kernel (``relpos_attention``).
``forward`` returns the neck embedding and the token maps after the blocks listed in
``feature_blocks`` (the UNet-H skips).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import relpos_attention
from .common import LayerNorm2d

# what else this encoder's output depends on (the embedding cache's key hashes these files too)
CODE_FILES = tuple(Path(__file__).with_name(n) for n in ("relpos_attention.py", "relpos_kernel.py", "common.py"))

VIT_CONFIGS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


def _rel_pos(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position table (size, size, C) for query/key grids of equal ``size``."""
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.T[None], size=length, mode="linear")[0].T
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[(coords[:, None] - coords[None, :]) + (size - 1)]


ATTENTION_IMPLS = ("auto", "bias", "augment", "fused")


def _onehot_keys(h: int, w: int, dtype, device) -> torch.Tensor:
    """(h*w, h+w): each key token's row and column as one-hot columns."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.cat([F.one_hot(rows, h), F.one_hot(cols, w)], -1).to(dtype)


class Attention(nn.Module):
    """SAM's attention with decomposed relative-position terms, through one fused attention call.

    ``impl`` is one form for every block or ``"GLOBAL,WINDOW"`` (e.g. ``"augment,bias"``): the first for
    the global blocks (at least ``GLOBAL_MIN_TOKENS`` tokens, 64x64 at 1024 input), the second for
    the 14x14 windows. Class default ``"auto"``: on CUDA ``fused`` for both (where the kernels cannot be
    built, ``relpos_attention.available``: ``augment`` for global blocks, ``bias`` for windows),
    ``bias`` on CPU (docs/performance.md: per-layer timings of each form on an H100). The forms:

    * ``bias``: the terms become an additive (B, heads, N, N) mask. Exact, but the mask is
      materialised (400 MB per image and global block at 1024 input) and rules out flash attention.
    * ``augment``: the same logits without the mask. The relative term of query i and key j is
      ``q_i . Rh[row_i, row_j] + q_i . Rw[col_i, col_j]``, i.e. a per-query vector ``e_i`` (h + w values)
      dotted with a one-hot of key j's row and column. So ``q' = [q * scale, e]``, ``k' = [k, onehot]``
      and ``softmax(q' k'^T) v`` equals SAM's attention; v is zero-padded to the same head size so
      PyTorch can pick its flash kernel (bf16 on CUDA). Equal to ``bias`` up to rounding
      (test/test_model.py).
    * ``fused``: the Triton kernels of ``relpos_attention``. Global blocks: flash attention whose key
      blocks are key rows, so each block adds one ``Rh`` value per query and the same ``Rw`` tile.
      Windows: all 196 keys in one tile, the terms added from one-hots built in registers (no mask
      in memory; 1.5x faster than ``bias`` per window layer on an H100). CUDA,
      bf16/fp16, inference only; shapes or uses they do not take (training, fp32, ViT-H's head size
      80) run ``augment`` (global blocks) or ``bias`` (windows) instead.
    """

    impl = "auto"

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int]):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    GLOBAL_MIN_TOKENS = 1024  # blocks with at least this many tokens count as global
    AUTO_CUDA = {"global": "fused", "window": "fused"}
    # where the kernels cannot be built or do not take the call (training, fp32, GPUs before 8.0, head
    # size 80): the faster of the other forms (H100, per layer: augment for the 64x64 global blocks,
    # 7.1 vs 23.2 ms; the mask for the 14x14 windows, 2.9 vs 3.9 ms)
    AUTO_CUDA_FALLBACK = {"global": "augment", "window": "bias"}

    def _kind(self, tokens: int) -> str:
        return "global" if tokens >= self.GLOBAL_MIN_TOKENS else "window"

    def resolved_impl(self, device: torch.device, tokens: int | None = None) -> str:
        if tokens is None:
            tokens = (self.rel_pos_h.shape[0] + 1) // 2 * ((self.rel_pos_w.shape[0] + 1) // 2)
        kind = self._kind(tokens)
        parts = str(self.impl).split(",")
        impl = parts[0] if len(parts) == 1 or kind == "global" else parts[1]
        if len(parts) > 2 or any(p not in ATTENTION_IMPLS for p in parts):
            raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS} or 'GLOBAL,WINDOW' of two, "
                             f"not {self.impl!r}")
        if impl == "auto":
            if device.type != "cuda":
                return "bias"
            return self.AUTO_CUDA[kind] if relpos_attention.available() else self.AUTO_CUDA_FALLBACK[kind]
        return impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # B, heads, N, hd
        hd = q.shape[-1]
        rh = _rel_pos(h, self.rel_pos_h).to(q.dtype)
        rw = _rel_pos(w, self.rel_pos_w).to(q.dtype)
        rq = q.reshape(b, self.num_heads, h, w, -1)
        # Per query and key row / key column, (B, heads, N, h) and (B, heads, N, w). The key side is padded
        # to a multiple of 8 for the products and the padding sliced off as a strided view: cuBLAS runs
        # the windows' 14-wide products through a slow misaligned kernel (4 % of the compiled encoder's
        # time on an H100; padded: 2 % more images/s). The fused kernels read the strided views.
        n = h * w
        kh, kw = (h + 7) // 8 * 8, (w + 7) // 8 * 8  # not -(-h // 8): the ONNX export divides toward zero
        bias_h = torch.einsum("bnhwc,hkc->bnhwk", rq, F.pad(rh, (0, 0, 0, kh - h))).reshape(b, -1, n, kh)[..., :h]
        bias_w = torch.einsum("bnhwc,wkc->bnhwk", rq, F.pad(rw, (0, 0, 0, kw - w))).reshape(b, -1, n, kw)[..., :w]
        impl = self.resolved_impl(x.device, n)
        if impl == "fused":
            if relpos_attention.supported(q, h, w) and not (torch.is_grad_enabled() and q.requires_grad):
                x = relpos_attention.relpos_attention(q, k, v, bias_h, bias_w, hd ** -0.5)  # B, N, heads, hd
                return self.proj(x.reshape(b, h, w, -1))
            impl = self.AUTO_CUDA_FALLBACK[self._kind(n)]
        if impl == "bias":
            bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, self.num_heads, n, n)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            extra = torch.cat([bias_h, bias_w], -1)
            width = (hd + h + w + 7) // 8 * 8  # head size a multiple of 8 (fused kernels' alignment)
            pad = width - (hd + h + w)
            qa = F.pad(torch.cat([q * hd ** -0.5, extra], -1), (0, pad))
            onehot = _onehot_keys(h, w, q.dtype, q.device).expand(b, self.num_heads, n, h + w)
            ka = F.pad(torch.cat([k, onehot], -1), (0, pad))
            va = F.pad(v, (0, width - hd))
            x = F.scaled_dot_product_attention(qa, ka, va, scale=1.0)[..., :hd]
        return self.proj(x.transpose(1, 2).reshape(b, h, w, -1))


def fused_attention_note(encoder: nn.Module, device: torch.device) -> str | None:
    """On CUDA, for an encoder with SAM attention left to ``auto``: why the fused kernels will not
    run, for the log (None where they can, or where the encoder has no such attention)."""
    if device.type != "cuda" or not any(isinstance(m, Attention) and m.impl == "auto" for m in encoder.modules()):
        return None
    why = relpos_attention.unavailable_reason()
    return None if why is None else f"SAM attention: the augmented and mask forms, not the fused kernels ({why})"


def linear_gelu_epilogue(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """``gelu(lin(x))`` as one matrix product whose epilogue adds the bias and applies GELU
    (``torch._addmm_activation``: cuBLASLt's GELU epilogue on CUDA, its tanh approximation; erf on
    CPU). In the autocast dtype where autocast is on (CUDA's autocast does not cover this op)."""
    dev = x.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    with torch.autocast(x.device.type, enabled=False):
        out = torch._addmm_activation(lin.bias.to(dt), x.reshape(-1, x.shape[-1]).to(dt), lin.weight.to(dt).t(),
                                      use_gelu=True)
    return out.reshape(*x.shape[:-1], -1)


class MLPBlock(nn.Module):
    """``gelu`` (class default, like ``Attention.impl``): ``"erf"``, SAM's exact GELU as its own
    kernel after the first product (8 % of the compiled encoder's time on an H100), or
    ``"epilogue"``: on CUDA without gradients, the first product, its bias and GELU in one cuBLASLt
    call (``linear_gelu_epilogue``; tanh-approximate GELU, within 5e-4 of erf per value, below bf16's
    rounding). Not measured on a GPU yet (bench/gpu-check-5.sh), so not the default."""

    gelu = "erf"

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x):
        if self.gelu not in ("erf", "epilogue"):
            raise ValueError(f"MLP gelu must be 'erf' or 'epilogue', not {self.gelu!r}")
        if self.gelu == "epilogue" and x.is_cuda and not torch.is_grad_enabled():
            return self.lin2(linear_gelu_epilogue(x, self.lin1))
        return self.lin2(F.gelu(self.lin1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int, grid: int):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        size = (window_size, window_size) if window_size else (grid, grid)
        self.attn = Attention(dim, num_heads, size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, dim * 4)

    def forward(self, x):  # B,H,W,C
        shortcut = x
        x = self.norm1(x)
        ws = self.window_size
        if ws:
            b, h, w, c = x.shape
            ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            x = x.view(b, hp // ws, ws, wp // ws, ws, c).transpose(2, 3).reshape(-1, ws, ws, c)
            x = self.attn(x)
            x = x.view(b, hp // ws, wp // ws, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)[:, :h, :w]
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)

    def forward(self, x):
        # One matrix product over the flattened patches (what the strided convolution computes):
        # cuDNN runs the 3-channel, stride-16 convolution as a slow implicit GEMM on CUDA.
        p = self.proj.kernel_size[0]
        b, c, hh, ww = x.shape
        gh, gw = hh // p, ww // p
        patches = x[:, :, :gh * p, :gw * p].reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        return F.linear(patches.reshape(b, gh, gw, c * p * p), self.proj.weight.reshape(self.proj.out_channels, -1),
                        self.proj.bias)


class ImageEncoderViT(nn.Module):
    def __init__(self, embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11),
                 img_size=1024, patch_size=16, out_chans=256, window_size=14):
        super().__init__()
        grid = img_size // patch_size
        self.embed_dim = embed_dim
        self.feature_blocks = tuple(global_attn_indexes[:-1])
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, 0 if i in global_attn_indexes else window_size, grid)
            for i in range(depth)])
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, 1, bias=False), LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans),
        )

    def skip_channels(self) -> list[int]:
        return [self.embed_dim] * len(self.feature_blocks)

    def skip_scales(self) -> list[int]:
        return [1] * len(self.feature_blocks)

    def forward(self, x):
        x = self.patch_embed(x) + self.pos_embed
        feats = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.feature_blocks:
                feats.append(x.permute(0, 3, 1, 2))
        return self.neck(x.permute(0, 3, 1, 2)), feats


def build_sam_vit(variant: str, img_size: int = 1024) -> ImageEncoderViT:
    return ImageEncoderViT(img_size=img_size, **VIT_CONFIGS[variant])
