"""Augmentation views, applied to the raw image and mask before ``model.preprocessing``.

With a frozen encoder the views are precomputed once into the embedding cache, with fixed
parameters; the training loop then samples a view per image and epoch. With an encoder trained on
the fly (fine-tuned) each draw of a view gets its own random parameters (``rng``): a crop of random
size and position for ``zoom``, a random gamma and gain for ``bright``, seeded per (seed, epoch,
sample) so that a resumed run draws the same. The class-balancing rule of the paper (strong
augmentation for normal, milder for malignant, none beyond flips for benign) is expressed as the
set of views each class may draw from (``class_views``) together with oversampling weights.
"""
from __future__ import annotations

import numpy as np

VIEWS = ("orig", "hflip", "zoom", "bright")
ZOOM_KEEP = (0.75, 0.95)  # random zoom: the share of each side kept (fixed: 0.85, centred)
GAMMA = (0.7, 1.4)  # random brightness: gamma (log-uniform) and gain (fixed: 0.8 and 1.1)
GAIN = (0.9, 1.15)


def apply_view(image: np.ndarray, mask: np.ndarray, view: str,
               rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``view`` of (image, mask): fixed parameters without ``rng`` (the embedding cache), drawn from
    ``rng`` with it (training on the fly)."""
    if view == "orig":
        return image, mask
    if view == "hflip":
        return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])
    if view == "zoom":  # a closer probe view: a crop, resized to the encoder's input as any image
        h, w = mask.shape
        if rng is None:  # central 85 % crop
            dh, dw = int(h * 0.075), int(w * 0.075)
            return image[dh:h - dh or None, dw:w - dw or None], mask[dh:h - dh or None, dw:w - dw or None]
        keep = rng.uniform(*ZOOM_KEEP)
        ch, cw = max(1, round(h * keep)), max(1, round(w * keep))
        ys, xs = np.nonzero(mask)
        y0 = _crop_start(rng, h, ch, (ys.min(), ys.max()) if ys.size else None)
        x0 = _crop_start(rng, w, cw, (xs.min(), xs.max()) if xs.size else None)
        return image[y0:y0 + ch, x0:x0 + cw], mask[y0:y0 + ch, x0:x0 + cw]
    if view == "bright":  # gain and gamma change (a different scanner setting)
        gamma, gain = (0.8, 1.1) if rng is None else (float(np.exp(rng.uniform(*np.log(GAMMA)))),
                                                      float(rng.uniform(*GAIN)))
        img = image.astype(np.float32)
        lo, hi = float(img.min()), float(img.max())
        scaled = (img - lo) / max(hi - lo, 1e-6)
        out = np.clip(scaled ** gamma * gain, 0, 1) * 255
        return out.astype(np.uint8), mask
    raise ValueError(f"unknown view {view!r}; known: {VIEWS}")


def _crop_start(rng: np.random.Generator, size: int, crop: int, lesion: tuple[int, int] | None) -> int:
    """A random start for a crop of ``crop`` of ``size`` pixels that keeps the lesion's extent
    [lo, hi] inside where it fits (else centred on it): a zoom never crops the lesion away."""
    lo, hi = 0, size - crop
    if lesion is not None:
        a, b = int(lesion[0]), int(lesion[1])
        if b - a + 1 <= crop:
            lo, hi = max(lo, b + 1 - crop), min(hi, a)
        else:
            lo = hi = min(max((a + b + 1 - crop) // 2, 0), size - crop)
    return int(rng.integers(lo, hi + 1))


def class_views(views: list[str]) -> dict[str, list[int]]:
    """Indices of the cached views each class draws from (strong for normal, milder for malignant)."""
    idx = {v: i for i, v in enumerate(views)}
    strong = [idx[v] for v in views]
    mild = [idx[v] for v in views if v in ("orig", "hflip", "zoom")] or [0]
    plain = [idx[v] for v in views if v in ("orig", "hflip")] or [0]
    return {"normal": strong, "malignant": mild, "benign": plain}
