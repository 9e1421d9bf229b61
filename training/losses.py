"""The paper's loss: 0.6 * (BCE + Dice) on the mask + 0.4 * cross-entropy on the class.

Dice is the soft Dice per image, ``1 - (2 sum(p g) + eps) / (sum(p) + sum(g) + eps)`` with
eps = 1e-6, averaged over the batch. On a normal image (empty ground truth) it is
``1 - eps / (sum(p) + eps)``: about 1 and nearly flat for any soft prediction (its gradient is
about eps / sum(p)^2), so there BCE alone pushes the prediction towards empty.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    p = torch.sigmoid(logits.float()).flatten(1)
    g = target.float().flatten(1)
    inter = (p * g).sum(1)
    return (1 - (2 * inter + eps) / (p.sum(1) + g.sum(1) + eps)).mean()


def multitask_loss(mask_logits: torch.Tensor, mask_target: torch.Tensor, class_logits: torch.Tensor,
                   labels: torch.Tensor, seg_weight: float = 0.6, cls_weight: float = 0.4,
                   eps: float = 1e-6) -> dict[str, torch.Tensor]:
    mask_logits = mask_logits.float().reshape(mask_target.shape)
    bce = F.binary_cross_entropy_with_logits(mask_logits, mask_target.float())
    dice = dice_loss(mask_logits, mask_target, eps)
    ce = F.cross_entropy(class_logits.float(), labels)
    seg = bce + dice
    return {"loss": seg_weight * seg + cls_weight * ce, "seg": seg, "bce": bce, "dice": dice, "ce": ce}
