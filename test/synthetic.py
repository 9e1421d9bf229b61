"""Realistic synthetic breast-ultrasound-like images for tests (generated, never real data).

Speckle (multiplicative Rayleigh noise) over a depth-attenuated tissue texture, with a dark,
slightly irregular hypoechoic lesion and posterior acoustic shadowing for lesion images.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # also when run as a script (demo.sh): python test/synthetic.py OUT
    sys.path.insert(0, str(REPO))

from model.atomic_files import write_png  # noqa: E402


def make_ultrasound(h: int, w: int, lesion: bool = True, seed: int = 0,
                    malignant: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    depth = 1.0 - 0.5 * yy / max(h - 1, 1)
    layers = 0.6 + 0.25 * np.sin(yy / max(h, 1) * 12 + rng.uniform(0, 6)) * depth
    speckle = rng.rayleigh(0.6, size=(h, w)).astype(np.float32)
    if min(h, w) >= 16:  # speckle grains span a few pixels, as in a scanner's image
        from scipy import ndimage

        speckle = ndimage.gaussian_filter(speckle, 1.2)
        speckle *= 0.6 * np.sqrt(np.pi / 2) / max(float(speckle.mean()), 1e-6)
    tissue = layers * depth * speckle
    mask = np.zeros((h, w), np.uint8)
    if lesion:
        cy, cx = rng.uniform(0.35, 0.6) * h, rng.uniform(0.3, 0.7) * w
        ry, rx = rng.uniform(0.1, 0.2) * h, rng.uniform(0.12, 0.25) * w
        ang = np.arctan2(yy - cy, xx - cx)
        wobble = 1 + (0.25 if malignant else 0.06) * np.sin(ang * (7 if malignant else 3) + rng.uniform(0, 6))
        r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        mask = (r < wobble).astype(np.uint8)
        edge = np.clip((r / wobble - 0.85) / 0.3, 0, 1)  # a soft, hypoechoic (not black) lesion
        tissue = tissue * (0.3 + 0.7 * edge)
        shadow = (xx > cx - rx * 0.8) & (xx < cx + rx * 0.8) & (yy > cy + ry)
        tissue = np.where(shadow, tissue * 0.6, tissue)
    img = np.clip(tissue / max(float(np.percentile(tissue, 99.5)), 1e-6) * 255, 0, 255).astype(np.uint8)
    return img, mask


def make_prepared_dataset(root: Path, n_per_class: int = 4, size: tuple[int, int] = (96, 128),
                          seed: int = 0) -> Path:
    """A tiny dataset in training.prepare's layout; 3/4 train, 1/4 val per class."""
    root = Path(root)
    rows, splits = [], []
    k = 0
    for code, label in enumerate(("normal", "benign", "malignant")):
        for j in range(n_per_class):
            k += 1
            iid = f"PACE_{k:05d}_{code:03d}_BUS"
            img, mask = make_ultrasound(*size, lesion=label != "normal", seed=seed * 1000 + k,
                                        malignant=label == "malignant")
            write_png(root / "images" / f"{iid}.png", img)
            write_png(root / "masks" / f"{iid}.png", mask * 255)
            rows.append({"image_id": iid, "label": label, "source": "BUS", "original_path": f"synthetic/{k}",
                         "patient_id": ""})
            splits.append({"image_id": iid, "split": "val" if j == n_per_class - 1 else "train"})
    for name, data, keys in (("labels.csv", rows, list(rows[0])), ("split.csv", splits, ["image_id", "split"])):
        with open(root / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, keys)
            w.writeheader()
            w.writerows(data)
    return root


def make_demo_folder(out: Path) -> list[Path]:
    """Six demo inputs of mixed sizes and formats (PNG grey, PNG RGB, JPEG, MetaImage with spacing)."""
    import SimpleITK as sitk
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = [("demo_benign_1.png", (420, 560), True, False), ("demo_malignant_1.png", (480, 640), True, True),
             ("demo_normal_1.png", (400, 520), False, False), ("demo_benign_2.jpg", (360, 500), True, False),
             ("demo_malignant_2.png", (512, 512), True, True), ("demo_spacing.mha", (300, 420), True, False)]
    paths = []
    for i, (name, hw, lesion, malignant) in enumerate(specs):
        img, _ = make_ultrasound(*hw, lesion=lesion, seed=100 + i, malignant=malignant)
        path = out / name
        if name.endswith(".jpg"):
            Image.fromarray(img).save(path, quality=92)
        elif name.endswith(".mha"):
            im = sitk.GetImageFromArray(img)
            im.SetSpacing((0.08, 0.08))
            sitk.WriteImage(im, str(path), useCompression=True)
        elif "malignant_1" in name:
            Image.fromarray(np.stack([img] * 3, -1)).save(path)
        else:
            write_png(path, img)
        paths.append(path)
    return paths


if __name__ == "__main__":
    import sys

    for p in make_demo_folder(Path(sys.argv[1] if len(sys.argv) > 1 else "demo/input")):
        print(p)


class UnwritableStream:
    """stdout or stderr on a full disk: every write and flush raises ENOSPC."""

    def write(self, text):
        raise OSError(28, "No space left on device")

    def flush(self):
        raise OSError(28, "No space left on device")
