"""A 2 x 2, stride-2 transposed convolution in the form whose training step is fast on CPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class UpConv2x2(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d(cin, cout, 2, stride=2)`` (the same parameters and state-dict keys) whose
    CPU training step runs it as what it is: a 1x1 convolution to ``4 * cout`` channels, one per
    output pixel of each 2 x 2 block, then ``pixel_shuffle``. oneDNN's transposed convolution has
    the slow backward on CPU; the outputs are equal (fp32 and bf16 autocast, tested). UNet-H on
    LiteMedSAM's features, one training step (batch 16, bf16 autocast, forward + backward, the AMX
    host): 2.19 -> 2.00 s. Without gradients, and on other devices, it is the transposed
    convolution itself: its forward is the faster one there (UNet-H's forward, batch 4, fp32:
    62 against 68 ms per image; the box refiner, whose SAM mask decoder upscales with two of them:
    27 ms per image as it is, 28 in the conv form), so predictions do not change by a rounding."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not torch.is_grad_enabled():
            return super().forward(x)
        cin, cout = self.weight.shape[:2]
        # out[o, 2i + di, 2j + dj] = sum_c x[c, i, j] w[c, o, di, dj] + b[o]; pixel_shuffle reads
        # channel o * 4 + di * 2 + dj as pixel (di, dj) of channel o
        w = self.weight.permute(1, 2, 3, 0).reshape(cout * 4, cin, 1, 1)
        b = None if self.bias is None else self.bias.repeat_interleave(4)
        return F.pixel_shuffle(F.conv2d(x, w, b), 2)
