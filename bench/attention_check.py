"""SAM attention on the device: does the augmented form (model/encoders/sam_vit.py) run on the
flash kernel, does it equal the additive-mask form, and how fast is each (one global block at 1024,
i.e. a 64x64 token grid, and one 14x14 window block).

    python bench/attention_check.py [--device cuda] [--batch-size 16]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.encoders.sam_vit import Attention  # noqa: E402


def _time(fn, device, reps=10):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


@click.command()
@click.option("--device", default="cuda")
@click.option("--batch-size", default=16)
def main(device, batch_size):
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out = {}
    torch.manual_seed(0)
    for name, grid, n in (("global", 64, batch_size), ("window", 14, batch_size * 25)):
        attn = Attention(768, 12, (grid, grid)).to(dev)
        with torch.no_grad():
            attn.rel_pos_h.normal_(0, 0.5)
            attn.rel_pos_w.normal_(0, 0.5)
        x = torch.randn(n, grid, grid, 768, device=dev)
        res = {}
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dev.type == "cuda"):
            outs = {}
            for impl in ("bias", "augment"):
                attn.impl = impl
                outs[impl] = attn(x).float()
                res[f"{impl}_ms"] = 1e3 * _time(lambda: attn(x), dev)
            res["rel_diff"] = float((outs["bias"] - outs["augment"]).norm() / outs["bias"].norm())
            if dev.type == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                attn.impl = "augment"
                try:
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        attn(x)
                    res["augment_runs_on_flash"] = True
                except RuntimeError as exc:
                    res["augment_runs_on_flash"] = f"no: {str(exc)[:200]}"
        out[name] = res
    print(json.dumps(out))


if __name__ == "__main__":
    main()
