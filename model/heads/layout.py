"""Memory layout of head inputs on CPU, where oneDNN's speed depends on it: channels-last.

On CPU the network's parameters and its heads' input are channels-last (``PFSAMNet.to_cpu_layout``;
``PFSAMNet.heads`` converts the embedding once, with ``channels_last_on_cpu``, for both heads); on
CUDA tensors pass unchanged. Measured on the 2-core development CPU
(batch 16, 256 x 64 x 64 embeddings, forward + backward, bf16 autocast, the training allocator
settings): SD-H 160 ms channels-last vs 291 ms NCHW. MGC-A's 1x1 convolution on channels-last input
with its output read as a token matrix and its masked means as one batched matrix product: 37 ms
(fp32 67 ms; forward alone 18 ms bf16, 28 ms fp32), against 54 ms (87; 25, 45) for the convolution
on NCHW and elementwise mask products, and 42 ms (111) for a linear layer over the tokens.
"""
from __future__ import annotations

import torch


def channels_last_on_cpu(t: torch.Tensor) -> torch.Tensor:
    """``t`` channels-last on CPU (a no-op when it is already); unchanged on other devices."""
    return t.contiguous(memory_format=torch.channels_last) if t.device.type == "cpu" else t
