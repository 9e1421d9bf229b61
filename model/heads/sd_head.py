"""SD-H: the light segmentation decoder (conv, norm, activation, bilinear upsampling; no skips).

256 x 64 x 64 embedding -> 1 x 256 x 256 mask logits (x4, the resolution of SAM's low-res masks).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .layout import GroupNorm


def conv_block(cin: int, cout: int, groups: int = 8, nchw_training: bool = False) -> nn.Sequential:
    """3x3 convolution (no bias), GroupNorm, GELU; ``nchw_training``: the norm's CPU training layout
    (model/heads/layout.py)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                         GroupNorm(min(groups, cout), cout, nchw_training=nchw_training), nn.GELU())


class SDHead(nn.Module):
    def __init__(self, embed_dim: int = 256, channels: tuple[int, ...] = (128, 64), dropout: float = 0.1):
        super().__init__()
        chans = [embed_dim, *channels]
        self.blocks = nn.ModuleList(conv_block(a, b, nchw_training=True) for a, b in zip(chans[:-1], chans[1:]))
        self.drop = nn.Dropout2d(dropout)
        self.out = nn.Conv2d(chans[-1], 1, 1)

    def forward(self, embedding, features=None):
        x = self.drop(embedding)
        for block in self.blocks[:-1]:
            x = F.interpolate(block(x), scale_factor=2, mode="bilinear", align_corners=False)
        # the 1x1 output convolution before the last upsampling: the same function (both are linear
        # and bilinear weights sum to 1), on 1 channel instead of channels[-1] at the output grid
        return F.interpolate(self.out(self.blocks[-1](x)), scale_factor=2, mode="bilinear", align_corners=False)
