"""Classifiers on the encoder embedding; classes in the order (normal, benign, malignant).

MGC-A (mask-guided classification with attention): the segmentation probability map, resized to
the embedding grid, is the attention weight of a pooling over (adapted) encoder features. The
lesion-weighted mean, the background-weighted mean and the lesion's area fraction feed a small MLP.
The mask is either given (ground truth, during the training curriculum) or the model's own
prediction (``sigmoid`` of its segmentation logits, detached).

GAP: the same MLP on globally average-pooled features (no mask guidance), the classifier of the
plain SD-H and UNet-H variants.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layout import on_cpu_as


def _mlp(cin: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(cin), nn.Linear(cin, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, num_classes))


class MGCAClassifier(nn.Module):
    uses_mask = True
    cpu_memory_format = torch.contiguous_format  # model/heads/layout.py

    def __init__(self, embed_dim: int = 256, num_classes: int = 3, hidden: int = 256, dropout: float = 0.3):
        super().__init__()
        self.adapt = nn.Sequential(nn.Conv2d(embed_dim, embed_dim, 1), nn.GELU())
        self.mlp = _mlp(2 * embed_dim + 1, hidden, num_classes, dropout)

    def forward(self, embedding: torch.Tensor, mask_prob: torch.Tensor) -> torch.Tensor:
        f = self.adapt(on_cpu_as(embedding, self.cpu_memory_format))
        m = mask_prob.float()
        if m.ndim == 3:
            m = m[:, None]
        m = F.interpolate(m, size=f.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
        m = m.clamp(0, 1).to(f.dtype)
        eps = 1e-6
        fg = (f * m).sum((2, 3)) / (m.sum((2, 3)) + eps)
        bg = (f * (1 - m)).sum((2, 3)) / ((1 - m).sum((2, 3)) + eps)
        area = m.mean((2, 3))
        return self.mlp(torch.cat([fg, bg, area], 1))


class GAPClassifier(nn.Module):
    uses_mask = False
    cpu_memory_format = torch.contiguous_format

    def __init__(self, embed_dim: int = 256, num_classes: int = 3, hidden: int = 256, dropout: float = 0.3):
        super().__init__()
        self.adapt = nn.Sequential(nn.Conv2d(embed_dim, embed_dim, 1), nn.GELU())
        self.mlp = _mlp(embed_dim, hidden, num_classes, dropout)

    def forward(self, embedding: torch.Tensor, mask_prob: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(self.adapt(on_cpu_as(embedding, self.cpu_memory_format)).mean((2, 3)))
