"""Memory layout of head inputs on CPU, where oneDNN's speed depends on it: channels-last.

On CPU the network's parameters and its heads' input are channels-last (``PFSAMNet.to_cpu_layout``;
``PFSAMNet.heads`` converts the embedding once, with ``channels_last_on_cpu``, for both heads); on
CUDA tensors pass unchanged. Measured on the 2-core development CPU
(batch 16, 256 x 64 x 64 embeddings, forward + backward, bf16 autocast, the training allocator
settings): SD-H 160 ms channels-last vs 291 ms NCHW (its GroupNorms aside: ``GroupNorm`` below). MGC-A's 1x1 convolution on channels-last input
with its output read as a token matrix and its masked means as one batched matrix product: 37 ms
(fp32 67 ms; forward alone 18 ms bf16, 28 ms fp32), against 54 ms (87; 25, 45) for the convolution
on NCHW and elementwise mask products, and 42 ms (111) for a linear layer over the tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (the same parameters and state-dict keys) that can run its CPU training step
    in NCHW: with ``nchw_training`` and gradients on, a channels-last bf16 input (bf16 autocast) is
    copied to NCHW for ATen's kernel and the result back. Without gradients, or for fp32, or where
    the head does not ask for it, it is nn.GroupNorm's own call, so predictions do not change by a
    rounding.

    Which layout is faster depends on the dtype and on the head around it, so the head chooses.
    One training step at batch 16 on LiteMedSAM's shapes (forward + backward, random inputs, the
    Intel AMX host, torch 2.14.1; the two forms alternating in one process, two runs of three to
    six rounds each, medians):

    ============  =====================  ======================
    step          NCHW round trip        nn.GroupNorm's own
    ============  =====================  ======================
    SD-H, bf16    148 / 158 ms           165 / 166 ms
    SD-H, fp32    372 / 383 ms           325 / 332 ms
    UNet-H, bf16  2035 / 1856 ms         1642 / 1629 ms
    UNet-H, fp32  5298 / 4365 ms         4286 / 4027 ms
    ============  =====================  ======================

    So SD-H (and MGC-A, which trains with it) takes the round trip in bf16, and UNet-H never
    (session 19 had given every GroupNorm the round trip, in fp32 too: SD-H 228 -> 206 ms, MGC-A
    220 -> 201 ms then, in bf16 with torch of that session). A size rule (the round trip in bf16
    up to 32 x 128 x 128 values per image, where the norm alone with its GELU is faster that way:
    69 against 91 ms at batch 16) gave UNet-H 1883 ms: its own kernel is faster inside that head."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 nchw_training: bool = False):
        super().__init__(num_groups, num_channels, eps, affine)
        self.nchw_training = nchw_training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.nchw_training and x.device.type == "cpu" and x.dtype == torch.bfloat16
                and torch.is_grad_enabled() and x.ndim == 4 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)):
            y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
            return y.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def channels_last_on_cpu(t: torch.Tensor) -> torch.Tensor:
    """``t`` channels-last on CPU (a no-op when it is already); unchanged on other devices."""
    return t.contiguous(memory_format=torch.channels_last) if t.device.type == "cpu" else t
