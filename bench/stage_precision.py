"""bf16 by stage for the default model's LiteMedSAM TinyViT on CPU: each module's time per image
in fp32 and in bf16 autocast (patch embedding, the four stages, the neck), then, for each split k,
the default ensemble's outputs with modules before k in fp32 and the rest in bf16, against all-fp32
(mask Dice, labels, probabilities) on a folder of real images.

    python bench/stage_precision.py IMAGES_DIR [--splits 1,2,3,4] [--images 32]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.io import list_images, read_image  # noqa: E402
from model.predictor import Predictor  # noqa: E402


def _modules(enc) -> list[torch.nn.Module]:
    return [enc.patch_embed, *enc.layers, enc.neck]


def _time_modules(enc, bf16: bool, batch: int, repeats: int = 3) -> np.ndarray:
    x = torch.randn(batch, 3, 256, 256).contiguous(memory_format=torch.channels_last)
    ts = np.zeros(len(_modules(enc)))
    with torch.inference_mode():
        for r in range(repeats + 1):  # the first round warms up
            h = x
            for i, m in enumerate(_modules(enc)):
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    h = m(h)
                if r:
                    ts[i] += time.perf_counter() - t
    return ts / repeats / batch


def _split_forward(enc, split: int):
    """TinyViT.forward with modules [0, split) in fp32 and the rest (the neck always) in bf16."""
    def forward(x):
        feats = []
        for i, m in enumerate([enc.patch_embed, *enc.layers]):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=i >= split):
                x = m(x)
            if i >= 1:
                feats.append(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = enc.neck(x)
        return emb.float(), [f.float() for f in feats[:-1]]
    return forward


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


@click.command()
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--splits", default="1,2,3,4", help="Modules before k stay fp32 (0 = patch embedding).")
@click.option("--images", "n_images", default=32)
@click.option("--batch-size", default=4)
def main(images_dir, splits, n_images, batch_size):
    torch.manual_seed(0)
    pred = Predictor.from_dir(device="cpu", precision="fp32", runtime="torch", batch_size=batch_size)
    enc = next(iter(pred.members.values())).encoder
    names = ["patch_embed"] + [f"stage{i}" for i in range(len(enc.layers))] + ["neck"]
    f32, b16 = _time_modules(enc, False, batch_size), _time_modules(enc, True, batch_size)
    for n, a, b in zip(names, f32, b16):
        print(f"{n:12s} fp32 {a * 1e3:7.1f} ms/image   bf16 {b * 1e3:7.1f} ms/image")
    print(f"{'encoder':12s} fp32 {f32.sum() * 1e3:7.1f} ms/image   bf16 {b16.sum() * 1e3:7.1f} ms/image")
    images = [read_image(p).array for p in list_images(images_dir)[:n_images]]
    base = pred.predict(images)
    for split in (int(s) for s in splits.split(",")):
        enc.forward = _split_forward(enc, split)
        out = pred.predict(images)
        d = np.array([_dice(p.mask, q.mask) for p, q in zip(base, out)])
        labels = np.mean([p.label == q.label for p, q in zip(base, out)])
        dp = max(abs(p.probabilities[k] - q.probabilities[k]) for p, q in zip(base, out) for k in p.probabilities)
        saved = (f32[split:] - b16[split:]).sum() * 1e3
        print(f"fp32 before {names[split]:12s}: Dice mean {d.mean():.4f} min {d.min():.4f}, "
              f"{int((d < 0.99).sum())} of {len(d)} below 0.99, labels equal {labels:.3f}, "
              f"max prob diff {dp:.4f}, saves {saved:.0f} ms/image")


if __name__ == "__main__":
    main()
