"""SAM ViT's MLP on the device: GELU as its own kernel (``erf``, SAM's) against GELU in the first
product's cuBLASLt epilogue (``epilogue``, model/encoders/sam_vit.py's ``MLPBlock``): one MLP block at
the encoder's shape (batch x 64 x 64 tokens x 768, bf16 autocast, eager), its time and its
difference, and the whole random-weight encoder's output difference between the two.

    python bench/mlp_check.py [--device cuda] [--batch-size 16]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attention_check import _time  # noqa: E402  (bench/ is this script's folder)
from model.encoders.sam_vit import MLPBlock, build_sam_vit  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@click.command()
@click.option("--device", default="cuda")
@click.option("--batch-size", default=16)
@click.option("--encoder-images", default=2, help="Images through the whole encoder for its difference.")
def main(device, batch_size, encoder_images):
    dev = torch.device(device)
    torch.manual_seed(0)
    mlp = MLPBlock(768, 3072).to(dev).eval()
    x = torch.randn(batch_size, 64, 64, 768, device=dev)
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "batch_size": batch_size}
    out = {}
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        for form in ("erf", "epilogue"):
            MLPBlock.gelu = form
            out[form] = mlp(x)
            res[f"{form}_ms"] = 1e3 * _time(lambda: mlp(x), dev)
    res["block_rel_diff"] = _rel(out["epilogue"], out["erf"])
    enc = build_sam_vit("vit_b").to(dev).eval()
    img = torch.randn(encoder_images, 3, 1024, 1024, device=dev)
    emb = {}
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        for form in ("erf", "epilogue"):
            MLPBlock.gelu = form
            emb[form] = enc(img)[0]
    MLPBlock.gelu = "erf"
    res["encoder_rel_diff"] = _rel(emb["epilogue"], emb["erf"])
    print(f"MLP block, batch {batch_size}, bf16: erf {res['erf_ms']:.2f} ms, epilogue {res['epilogue_ms']:.2f} ms; "
          f"relative difference {res['block_rel_diff']:.2e} (block), {res['encoder_rel_diff']:.2e} (encoder)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
