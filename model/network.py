"""The multi-task network: a prompt-free SAM-family encoder + a segmentation head + a classifier.

Variants (training/configs): ``unet-h`` = UNet-H + GAP classifier, ``sd-h`` = SD-H + GAP classifier,
``mgc-a`` = SD-H + MGC-A classifier guided by the segmentation map. The encoder is either
``finetuned`` (trained with the heads) or ``frozen`` (inference mode, no gradients; its output can
be cached during training and shared by ensemble members at inference).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from . import CLASS_NAMES
from .encoders import build_encoder, get_spec
from .heads import build_cls_head, build_seg_head
from .heads.layout import channels_last_on_cpu

FORMAT_VERSION = 1
ENCODER_MODES = ("frozen", "finetuned")


def make_config(encoder: str = "litemedsam", mode: str = "frozen", seg_head: str = "sd-h",
                cls_head: str = "mgc-a", seg_head_args: dict | None = None, cls_head_args: dict | None = None,
                encoder_weights: dict | None = None) -> dict:
    """A complete, validated model config (what checkpoint.json stores)."""
    spec = get_spec(encoder)
    cfg = {
        "format_version": FORMAT_VERSION,
        "encoder": {"name": encoder, "mode": mode, "input_size": spec.input_size,
                    "normalization": spec.normalization,
                    "weights": encoder_weights or {"source": "pretrained"}},
        "seg_head": {"type": seg_head, **(seg_head_args or {})},
        "cls_head": {"type": cls_head, **(cls_head_args or {})},
        "class_names": list(CLASS_NAMES),
    }
    return validate_config(cfg)


def validate_config(cfg: dict) -> dict:
    """Raise ``ValueError`` naming the first problem; return a deep copy."""
    cfg = copy.deepcopy(cfg)
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported model format_version {cfg.get('format_version')!r} "
                         f"(this code reads version {FORMAT_VERSION})")
    for key in ("encoder", "seg_head", "cls_head", "class_names"):
        if key not in cfg:
            raise ValueError(f"model config lacks {key!r}")
    enc = cfg["encoder"]
    spec = get_spec(enc.get("name"))
    if enc.get("mode") not in ENCODER_MODES:
        raise ValueError(f"encoder mode must be one of {ENCODER_MODES}, not {enc.get('mode')!r}")
    size = enc.get("input_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 16 or size % 16:
        raise ValueError(f"encoder input_size must be a whole number of 16-px patches, not {size!r}")
    if spec.fixed_size and size != spec.input_size:  # it loaded, then every image failed at prediction
        raise ValueError(f"encoder {spec.name} takes {spec.input_size}-px input only, config says input_size {size}")
    if enc.get("normalization") != spec.normalization:
        raise ValueError(f"encoder {spec.name} takes {spec.normalization!r} normalisation, "
                         f"config says {enc.get('normalization')!r}")
    if list(cfg["class_names"]) != list(CLASS_NAMES):
        raise ValueError(f"class_names must be {list(CLASS_NAMES)}, got {cfg['class_names']}")
    return cfg


class PFSAMNet(nn.Module):
    def __init__(self, config: dict, encoder: nn.Module | None = None, encoder_weights: str = "pretrained",
                 encoder_checkpoint=None):
        super().__init__()
        self.config = validate_config(config)
        enc_cfg = self.config["encoder"]
        if encoder is None:
            encoder, _ = build_encoder(enc_cfg["name"], weights=encoder_weights, checkpoint=encoder_checkpoint,
                                       sha256=enc_cfg["weights"].get("sha256"),
                                       input_size=enc_cfg["input_size"])
        self.encoder = encoder
        self.input_size = enc_cfg["input_size"]
        self.normalization = enc_cfg["normalization"]
        self.frozen = enc_cfg["mode"] == "frozen"
        self.seg_head = build_seg_head(self.config["seg_head"], 256, encoder.skip_channels(), encoder.skip_scales())
        self.cls_head = build_cls_head(self.config["cls_head"], 256, len(CLASS_NAMES))
        if self.frozen:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    @property
    def needs_features(self) -> bool:
        return self.config["seg_head"]["type"] == "unet-h"

    @property
    def uses_mask(self) -> bool:
        return bool(getattr(self.cls_head, "uses_mask", False))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def to_cpu_layout(self) -> "PFSAMNet":
        """Channels-last parameters, the layout oneDNN runs fastest (model/heads/layout.py)."""
        return self.to(memory_format=torch.channels_last)

    def encode(self, x: torch.Tensor):
        if self.frozen:
            with torch.no_grad():
                return self.encoder(x)
        return self.encoder(x)

    def heads(self, embedding: torch.Tensor, features=None, guide_mask: torch.Tensor | None = None) -> dict:
        """Head outputs from encoder outputs. ``guide_mask``: MGC-A's mask (B x 1 x R x R, in
        [0, 1]), or a function of the predicted mask logits that returns it (the training
        curriculum); None means the model's own predicted mask (detached)."""
        embedding = channels_last_on_cpu(embedding)  # once, for both heads
        mask_logits = self.seg_head(embedding, features)
        if self.uses_mask:
            if callable(guide_mask):
                guide_mask = guide_mask(mask_logits)
            if guide_mask is None:
                guide_mask = torch.sigmoid(mask_logits.detach().float())
            class_logits = self.cls_head(embedding, guide_mask)
        else:
            class_logits = self.cls_head(embedding)
        return {"mask_logits": mask_logits, "class_logits": class_logits}

    def forward(self, x: torch.Tensor | None = None, guide_mask: torch.Tensor | None = None,
                embedding: torch.Tensor | None = None, features=None) -> dict:
        """From images ``x``, or from precomputed encoder outputs (``embedding``, ``features``)."""
        if embedding is None:
            embedding, features = self.encode(x)
        return self.heads(embedding, features if self.needs_features else None, guide_mask)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}
