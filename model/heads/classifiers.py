"""Classifiers on the encoder embedding; classes in the order (normal, benign, malignant).

MGC-A (mask-guided classification with attention): the segmentation probability map, resized to
the embedding grid, is the attention weight of a pooling over (adapted) encoder features. The
lesion-weighted mean, the background-weighted mean and the lesion's area fraction feed a small MLP.
The mask is either given (ground truth, during the training curriculum) or the model's own
prediction (``sigmoid`` of its segmentation logits, detached).

GAP: the same MLP on globally average-pooled features (no mask guidance), the classifier of the
plain SD-H and UNet-H variants.

Both adapt the features with a 1x1 convolution and GELU. On CPU the convolution runs on the
channels-last embedding, so its output is already a ``B x HW x C`` token matrix, and MGC-A's two
weighted means are one batched matrix product of the ``2 x HW`` weights with it
(model/heads/layout.py has the timings).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _mlp(cin: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(cin), nn.Linear(cin, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, num_classes))


def _adapt(embed_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(embed_dim, embed_dim, 1), nn.GELU())


def adapted_tokens(adapt: nn.Sequential, embedding: torch.Tensor) -> torch.Tensor:
    """``adapt`` (1x1 conv, activation) of a ``B x C x H x W`` embedding as ``B x HW x C`` tokens."""
    conv, act = adapt
    f = conv(embedding)
    b, c, h, w = f.shape
    return act(f.permute(0, 2, 3, 1).reshape(b, h * w, c))  # a view where f is channels-last (CPU)


class MGCAClassifier(nn.Module):
    uses_mask = True

    def __init__(self, embed_dim: int = 256, num_classes: int = 3, hidden: int = 256, dropout: float = 0.3):
        super().__init__()
        self.adapt = _adapt(embed_dim)
        self.mlp = _mlp(2 * embed_dim + 1, hidden, num_classes, dropout)

    def forward(self, embedding: torch.Tensor, mask_prob: torch.Tensor) -> torch.Tensor:
        f = adapted_tokens(self.adapt, embedding)  # B x HW x C
        m = mask_prob.float()
        if m.ndim == 3:
            m = m[:, None]
        m = F.interpolate(m, size=embedding.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
        m = m.clamp(0, 1).flatten(1)  # B x HW
        weights = torch.stack([m, 1 - m], 1)  # lesion, background: B x 2 x HW
        means = torch.bmm(weights.to(f.dtype), f) / (weights.sum(-1, keepdim=True) + 1e-6).to(f.dtype)
        area = m.mean(1, keepdim=True).to(f.dtype)
        return self.mlp(torch.cat([means[:, 0], means[:, 1], area], 1))


class GAPClassifier(nn.Module):
    uses_mask = False

    def __init__(self, embed_dim: int = 256, num_classes: int = 3, hidden: int = 256, dropout: float = 0.3):
        super().__init__()
        self.adapt = _adapt(embed_dim)
        self.mlp = _mlp(embed_dim, hidden, num_classes, dropout)

    def forward(self, embedding: torch.Tensor, mask_prob: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(adapted_tokens(self.adapt, embedding).mean(1))
