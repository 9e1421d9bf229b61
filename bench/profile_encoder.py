"""Where the SAM ViT encoder's time goes: the product's encoder (random weights, bf16 autocast on
CUDA, optionally compiled) profiled over a few batches; prints images/s and the kernels that take
the most device time, grouped into matrix products, attention, and the rest.

    python bench/profile_encoder.py --encoder sam_vit_b --batch-size 32 --attention fused,bias --compile inductor
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.encoders import build_encoder  # noqa: E402
from model.encoders.sam_vit import Attention  # noqa: E402


def _kind(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "attention", "flex", "sdpa", "cudnn", "relpos")):
        return "attention"
    if any(s in n for s in ("gemm", "cutlass", "sm90_xmma", "nvjet", "matmul", "mm", "linear", "conv")):
        return "matmul/conv"
    return "other (norms, activations, copies)"


@click.command()
@click.option("--encoder", default="sam_vit_b")
@click.option("--device", default="cuda")
@click.option("--batch-size", default=32)
@click.option("--attention", default="auto")
@click.option("--compile", "compile_backend", default=None)
@click.option("--top", default=12)
def main(encoder, device, batch_size, attention, compile_backend, top):
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    Attention.impl = attention
    enc, _ = build_encoder(encoder, weights="random")
    enc = enc.to(dev).eval()
    size = 1024
    run = torch.compile(enc, backend=compile_backend, dynamic=False) if compile_backend else enc
    x = torch.randn(batch_size, 3, size, size, device=dev)

    def step():
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            return run(x)

    t0 = time.perf_counter()
    step()
    warm = time.perf_counter() - t0
    step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 4
    for _ in range(reps):
        step()
    if cuda:
        torch.cuda.synchronize()
    ips = reps * batch_size / (time.perf_counter() - t0)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(2):
            step()
        if cuda:
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if (e.device_type == torch.autograd.DeviceType.CUDA) == cuda]
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(events, key=lambda e: getattr(e, attr, 0), reverse=True)
    total = sum(getattr(e, attr, 0) for e in events) or 1
    groups: dict[str, float] = {}
    for e in events:
        groups[_kind(e.key)] = groups.get(_kind(e.key), 0) + getattr(e, attr, 0)
    print(json.dumps({"encoder": encoder, "batch_size": batch_size, "attention": attention,
                      "compile": compile_backend, "warmup_s": round(warm, 1), "images_per_s": round(ips, 1),
                      "share": {k: round(v / total, 3) for k, v in sorted(groups.items())},
                      "device_ms_per_batch": round(total / 2 / 1e3, 2)}))
    for e in events[:top]:
        print(f"{100 * getattr(e, attr, 0) / total:5.1f}%  {getattr(e, attr, 0) / 2e3:8.2f} ms/batch  "
              f"{_kind(e.key)[:9]:9s}  {e.key[:110]}")


if __name__ == "__main__":
    main()
