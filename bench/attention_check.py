"""SAM attention on the device: each form of model/encoders/sam_vit.py's ``Attention`` (additive
mask, q/k augmented for flash attention, the fused Triton kernel), whether it equals the mask
form and how fast it is, for one global block at 1024 (a 64x64 token grid) and one 14x14 window
block; plus plain flash attention without the relative-position terms (the floor for a fused
relative-position kernel), ViT-H's head size (80, which the fused form hands to ``augment``), and
the device's measured bf16 matrix-product rate.

    python bench/attention_check.py [--device cuda] [--batch-size 16]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F

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


def _matmul_tflops(dev, n=8192) -> float:
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    return 2 * n ** 3 / _time(lambda: a @ b, dev, reps=20) / 1e12


@click.command()
@click.option("--device", default="cuda")
@click.option("--batch-size", default=16)
@click.option("--forms", default="bias,augment,fused", show_default=True)
def main(device, batch_size, forms):
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    out = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__}
    if cuda:
        out["matmul_bf16_tflops"] = round(_matmul_tflops(dev), 1)
    torch.manual_seed(0)
    for name, grid, n, dim, heads in (("global", 64, batch_size, 768, 12), ("window", 14, batch_size * 25, 768, 12),
                                      ("global_vit_h", 64, 2, 1280, 16)):
        attn = Attention(dim, heads, (grid, grid)).to(dev)
        with torch.no_grad():
            attn.rel_pos_h.normal_(0, 0.5)
            attn.rel_pos_w.normal_(0, 0.5)
        x = torch.randn(n, grid, grid, dim, device=dev)
        res = {}
        # useful attention FLOPs of one call (q k^T and p v), as the benchmark counts them
        flops = 4 * n * heads * (grid * grid) ** 2 * (dim // heads)
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=cuda):
            outs = {}
            for impl in forms.split(",") if name != "global_vit_h" else ("bias", "fused"):
                attn.impl = impl
                try:
                    t0 = time.perf_counter()
                    outs[impl] = attn(x).float()
                    res[f"{impl}_first_call_s"] = round(time.perf_counter() - t0, 2)
                    if name != "global_vit_h":
                        ms = 1e3 * _time(lambda: attn(x), dev)
                        res[f"{impl}_ms"] = round(ms, 3)
                        res[f"{impl}_attention_tflops"] = round(flops / ms / 1e9, 1)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    res[impl] = f"failed: {exc.__class__.__name__}: {str(exc)[:300]}"
            for impl, o in outs.items():
                if impl != "bias" and "bias" in outs:
                    res[f"{impl}_rel_diff"] = float((o - outs["bias"]).norm() / outs["bias"].norm())
            if cuda and name != "global_vit_h":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                hd = dim // heads
                q, k, v = (torch.randn(n, heads, grid * grid, hd, device=dev, dtype=dtype) for _ in range(3))
                ms = 1e3 * _time(lambda: F.scaled_dot_product_attention(q, k, v), dev)
                res["plain_flash_core_ms"] = round(ms, 3)
                res["plain_flash_core_tflops"] = round(flops / ms / 1e9, 1)
                attn.impl = "augment"
                for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
                    try:
                        with sdpa_kernel(getattr(SDPBackend, backend)):
                            ms = 1e3 * _time(lambda: attn(x), dev)
                        res[f"augment_{backend.lower()}_ms"] = round(ms, 3)
                    except Exception as exc:  # noqa: BLE001
                        res[f"augment_{backend.lower()}"] = f"no: {str(exc)[:200]}"
        if cuda and name in ("global", "window"):
            from model.encoders.relpos_attention import kernel

            shape = "rows" if name == "global" else "tile"
            res["fused_best_config"] = str(getattr(kernel(shape=shape), "best_config", None))
        out[name] = res
        print(json.dumps({name: res}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
