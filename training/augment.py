"""Augmentation views, applied to the raw image and mask before ``model.preprocessing``.

With a frozen encoder the views are precomputed once into the embedding cache; the training loop
then samples a view per image and epoch. The class-balancing rule of the paper (strong
augmentation for normal, milder for malignant, none beyond flips for benign) is expressed as the
set of views each class may draw from (``class_views``) together with oversampling weights.
"""
from __future__ import annotations

import numpy as np

VIEWS = ("orig", "hflip", "zoom", "bright")


def apply_view(image: np.ndarray, mask: np.ndarray, view: str) -> tuple[np.ndarray, np.ndarray]:
    if view == "orig":
        return image, mask
    if view == "hflip":
        return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])
    if view == "zoom":  # central 85% crop (a closer probe view)
        h, w = mask.shape
        dh, dw = int(h * 0.075), int(w * 0.075)
        return image[dh:h - dh or None, dw:w - dw or None], mask[dh:h - dh or None, dw:w - dw or None]
    if view == "bright":  # gain and gamma change (a different scanner setting)
        img = image.astype(np.float32)
        lo, hi = float(img.min()), float(img.max())
        scaled = (img - lo) / max(hi - lo, 1e-6)
        out = np.clip(scaled ** 0.8 * 1.1, 0, 1) * 255
        return out.astype(np.uint8), mask
    raise ValueError(f"unknown view {view!r}; known: {VIEWS}")


def class_views(views: list[str]) -> dict[str, list[int]]:
    """Indices of the cached views each class draws from (strong for normal, milder for malignant)."""
    idx = {v: i for i, v in enumerate(views)}
    strong = [idx[v] for v in views]
    mild = [idx[v] for v in views if v in ("orig", "hflip", "zoom")] or [0]
    plain = [idx[v] for v in views if v in ("orig", "hflip")] or [0]
    return {"normal": strong, "malignant": mild, "benign": plain}
