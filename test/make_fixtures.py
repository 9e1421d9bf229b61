"""Synthetic breast-ultrasound-like images, generated deterministically (numpy + PIL + SimpleITK).

An image: tissue texture (multiplicative Rayleigh speckle over smoothed random echogenicity),
horizontal layers (skin, fascia), depth attenuation, a dark elliptical hypoechoic lesion with a
soft irregular margin and posterior acoustic enhancement. ``synthetic_ultrasound`` is used by the
tests; run as a script it (re)writes the container fixtures under ``test/input`` (the Grand
Challenge layout ``images/<slug>/``): a grey PNG, an RGB JPEG and an .mha with non-unit spacing
and a non-zero origin. The files are small on purpose (they are committed).

    python test/make_fixtures.py            # writes test/input/images/breast-ultrasound-image/*
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
INPUT_SLUG = "breast-ultrasound-image"


def _smooth(field: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (reflect padding), numpy only."""
    radius = max(1, int(3 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    out = field.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect" if out.shape[axis] > radius else "edge")
        out = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), axis, padded)
    return out


def synthetic_ultrasound(height: int, width: int, seed: int = 0, lesion: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 H x W image, uint8 H x W lesion mask {0,1}); the same arguments give the same arrays."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    # Tissue echogenicity: smooth random field + layers near the top.
    tissue = 0.55 + 0.25 * _smooth(rng.standard_normal((height, width)), max(2.0, min(height, width) / 12))
    depth = yy / max(1, height - 1)
    tissue += 0.35 * np.exp(-((depth - 0.06) / 0.025) ** 2)  # skin line
    tissue += 0.20 * np.exp(-((depth - 0.22 - 0.03 * np.sin(xx / max(8, width / 5))) / 0.02) ** 2)  # fascia
    mask = np.zeros((height, width), np.uint8)
    if lesion:
        cy = height * rng.uniform(0.45, 0.6)
        cx = width * rng.uniform(0.35, 0.65)
        ry = height * rng.uniform(0.12, 0.18)
        rx = width * rng.uniform(0.15, 0.25)
        theta = np.arctan2(yy - cy, xx - cx)
        wobble = 1.0 + 0.08 * np.sin(3 * theta + rng.uniform(0, 6.28)) + 0.05 * np.sin(5 * theta)
        r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) / wobble
        mask = (r <= 1.0).astype(np.uint8)
        inside = 1.0 / (1.0 + np.exp((r - 1.0) * 12.0))  # soft margin
        tissue = tissue * (1.0 - 0.8 * inside)
        # Posterior acoustic enhancement below the lesion.
        below = (yy > cy) & (np.abs(xx - cx) < rx * 0.9)
        tissue += 0.15 * below * (1.0 - inside) * np.exp(-(yy - cy - ry).clip(0) / (height * 0.25))
    tissue *= np.exp(-1.2 * depth)  # attenuation with depth
    speckle = rng.rayleigh(scale=1.0 / np.sqrt(np.pi / 2), size=(height, width))  # mean 1
    img = _smooth(tissue.clip(0, None) * speckle, 0.6)
    img = 255.0 * (img / np.percentile(img, 99.5)).clip(0, 1) ** 0.8
    return img.round().astype(np.uint8), mask


FIXTURES = (  # name, height, width, seed
    ("bus_grey.png", 109, 143, 1),
    ("bus_rgb.jpg", 97, 131, 2),
    ("bus_spacing.mha", 88, 121, 3),
)
MHA_SPACING = (0.085, 0.11)  # (x, y) mm
MHA_ORIGIN = (12.5, -3.25)


def write_fixture(path: Path, height: int, width: int, seed: int) -> None:
    import SimpleITK as sitk

    img, _ = synthetic_ultrasound(height, width, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".png":
        Image.fromarray(img).save(path, optimize=True)
    elif suffix in (".jpg", ".jpeg"):
        rgb = np.stack([img, (img * 0.97).astype(np.uint8), img], axis=-1)  # slightly tinted RGB
        Image.fromarray(rgb).save(path, quality=85)
    elif suffix == ".mha":
        im = sitk.GetImageFromArray(img)
        im.SetSpacing(MHA_SPACING)
        im.SetOrigin(MHA_ORIGIN)
        sitk.WriteImage(im, str(path), useCompression=True)
    else:
        raise ValueError(f"no fixture writer for {suffix}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "input" / "images" / INPUT_SLUG)
    args = parser.parse_args()
    for name, h, w, seed in FIXTURES:
        write_fixture(args.out / name, h, w, seed)
        print(f"{args.out / name}: {h}x{w}, {(args.out / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
