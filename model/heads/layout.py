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
    """``nn.GroupNorm`` (the same parameters and state-dict keys) whose CPU training step runs in
    NCHW: ATen's channels-last GroupNorm, above all its backward, is slower on CPU than its NCHW
    kernel (forward + backward at 16 x 32 x 128 x 128: 44 against 9 ms in bf16, 48 against 34 ms
    in fp32), so with gradients on, a channels-last input is copied to NCHW and the result back.
    One cached training step at batch 16 in bf16 autocast, alternating in one process (session 19):
    SD-H 228 -> 206 ms, MGC-A 220 -> 201 ms.
    Without gradients it is nn.GroupNorm's own call, so predictions do not change by a rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and torch.is_grad_enabled() and x.ndim == 4 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)):
            y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
            return y.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def channels_last_on_cpu(t: torch.Tensor) -> torch.Tensor:
    """``t`` channels-last on CPU (a no-op when it is already); unchanged on other devices."""
    return t.contiguous(memory_format=torch.channels_last) if t.device.type == "cpu" else t
