"""A 2 x 2, stride-2 transposed convolution in the form that is fast on CPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class UpConv2x2(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d(cin, cout, 2, stride=2)`` (the same parameters and state-dict keys) that
    runs on CPU as what it is: a 1x1 convolution to ``4 * cout`` channels, one per output pixel of
    each 2 x 2 block, then ``pixel_shuffle``. oneDNN's transposed convolution is the slow kernel on
    CPU, above all its backward; the outputs are equal (fp32 and bf16 autocast, tested). UNet-H on
    LiteMedSAM's features, one training step (batch 16, bf16 autocast, forward + backward, the AMX
    host): 2.19 -> 2.00 s. On other devices it is the transposed convolution itself.
    Used by UNet-H and by SAM's mask decoder (the box refiner's output upscaling)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        cin, cout = self.weight.shape[:2]
        # out[o, 2i + di, 2j + dj] = sum_c x[c, i, j] w[c, o, di, dj] + b[o]; pixel_shuffle reads
        # channel o * 4 + di * 2 + dj as pixel (di, dj) of channel o
        w = self.weight.permute(1, 2, 3, 0).reshape(cout * 4, cin, 1, 1)
        b = None if self.bias is None else self.bias.repeat_interleave(4)
        return F.pixel_shuffle(F.conv2d(x, w, b), 2)
