"""MGC-A's mask curriculum: which mask guides the classifier in an epoch (ground truth, prediction, or
either at random), with draws seeded so that a resumed run and torchrun's ranks draw as they should."""
from __future__ import annotations

import torch


def curriculum_phase(cfg: dict, epoch: int) -> str:
    """``gt`` (epochs 1..gt_until), ``mixed`` (..mixed_until), ``pred`` after; epochs are 1-based."""
    c = cfg["curriculum"]
    if epoch <= c["gt_until"]:
        return "gt"
    return "mixed" if epoch <= c["mixed_until"] else "pred"


def curriculum_generator(seed: int, epoch: int, rank: int = 0, world: int = 1) -> torch.Generator:
    """The mixed phase's ground-truth-or-prediction draws of one epoch on one rank: seeded by (seed,
    epoch), so a resumed run draws the same, and by the rank, so that torchrun's ranks draw apart
    (one process: the seed of before, seed * 1000 + epoch)."""
    return torch.Generator().manual_seed((seed * 1000 + epoch) * world + rank)


def guide_masks(phase: str, gt: torch.Tensor, pred_logits: torch.Tensor, p_gt: float,
                gen: torch.Generator) -> torch.Tensor:
    gt = gt[:, None].float()
    pred = torch.sigmoid(pred_logits.detach().float())
    if phase == "gt":
        return gt
    if phase == "pred":
        return pred
    pick = (torch.rand(gt.shape[0], generator=gen) < p_gt).to(gt.device)[:, None, None, None]
    return torch.where(pick, gt, pred)
