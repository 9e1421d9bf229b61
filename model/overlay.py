"""Overlays for people to look at: the image, the predicted lesion's contour in red, the label
and its probability (display only: nothing here feeds the network)."""
from __future__ import annotations

import numpy as np


def to_display_rgb(array: np.ndarray) -> np.ndarray:
    """Any supported image array -> uint8 H x W x 3 for display (min-max for non-uint8 types)."""
    a = np.asarray(array)
    if a.ndim == 3:
        a = a[..., 0] if a.shape[2] in (1, 2) else a[..., :3]
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros(a.shape, np.uint8) if hi <= lo else ((a - lo) * (255.0 / (hi - lo))).round().astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.array(a, dtype=np.uint8, order="C", copy=True)  # writable, never a view of the input


def mask_contour(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Boolean H x W: lesion pixels that touch the background (4-neighbourhood), ``thickness`` wide."""
    m = mask.astype(bool)
    inner = m.copy()
    for _ in range(max(1, thickness)):
        p = np.pad(inner, 1, constant_values=False)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def render_overlay(image: np.ndarray, mask: np.ndarray | None, label: str | None,
                   probabilities: dict[str, float] | None) -> np.ndarray:
    """uint8 H x W x 3: the image, the mask's contour in red, the label and its probability."""
    from PIL import Image, ImageDraw, ImageFont

    rgb = to_display_rgb(image)
    h, w = rgb.shape[:2]
    if mask is not None:
        contour = mask_contour(mask, thickness=max(1, round(min(h, w) / 200)))
        rgb[contour] = (255, 40, 40)
    if label is None:
        return rgb
    text = label.capitalize()
    if probabilities is not None:
        text += f" {probabilities[label]:.2f}"
    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    size = max(10, min(h, w) // 14)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        font = ImageFont.load_default()
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    pad = max(2, size // 5)
    draw.rectangle((0, 0, x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), fill=(0, 0, 0))
    colour = {"normal": (120, 220, 120), "benign": (255, 220, 80), "malignant": (255, 90, 90)}.get(label, (255, 255, 255))
    draw.text((pad - x0, pad - y0), text, fill=colour, font=font)
    return np.asarray(im)
