"""Memory layout of a head's input on CPU, where oneDNN's speed depends on it.

Measured on the 2-core development CPU (batch 16, 256 x 64 x 64 embeddings, forward + backward,
bf16 autocast): SD-H 160 ms channels-last vs 291 ms NCHW; the classifiers (1x1 conv, GELU,
pooling) 54 ms NCHW vs 105-112 ms channels-last. So each head names its layout
(``cpu_memory_format``), puts its input in it, and ``PFSAMNet.to_cpu_layout`` its parameters; on
CUDA tensors pass unchanged.
"""
from __future__ import annotations

import torch


def on_cpu_as(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    return t.contiguous(memory_format=memory_format) if t.device.type == "cpu" else t
