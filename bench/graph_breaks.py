"""How many graphs torch.compile makes of the SAM ViT encoder, and why it breaks them
(``torch._dynamo.explain``, bf16 autocast, no gradients). ``--old-probe`` puts back the way
``relpos_attention.available`` was asked before session 9 (traced into, hence a break in every
attention block on CUDA), to compare in the same process.

    python bench/graph_breaks.py [--device cuda] [--encoder sam_vit_b] [--old-probe]
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.encoders import relpos_attention  # noqa: E402
from model.encoders.sam_vit import build_sam_vit  # noqa: E402


def use_old_probe() -> None:
    """``available`` as an lru_cache around the probe, as before session 9: dynamo traces into it."""
    relpos_attention.available = functools.lru_cache(maxsize=None)(lambda: relpos_attention.unavailable_reason() is None)


@click.command()
@click.option("--device", default="cuda")
@click.option("--encoder", "variant", default="vit_b", type=click.Choice(["vit_b", "vit_l", "vit_h"]))
@click.option("--batch-size", default=2)
@click.option("--old-probe", is_flag=True, help="Ask relpos_attention.available as before session 9.")
def main(device, variant, batch_size, old_probe):
    if old_probe:
        use_old_probe()
    dev = torch.device(device)
    enc = build_sam_vit(variant).to(dev).eval()
    x = torch.randn(batch_size, 3, 1024, 1024, device=dev)
    torch._dynamo.reset()
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        ex = torch._dynamo.explain(enc)(x)
    reasons = sorted({str(getattr(b, "reason", b)).splitlines()[0][:160] for b in ex.break_reasons})
    res = {"device": str(dev), "encoder": variant, "old_probe": old_probe, "graphs": ex.graph_count,
           "graph_breaks": ex.graph_break_count, "reasons": reasons}
    print(f"{variant} on {dev}{' (old probe)' if old_probe else ''}: {ex.graph_count} graph(s), "
          f"{ex.graph_break_count} break(s)" + "".join(f"\n  {r}" for r in reasons))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
