"""Heads: segmentation decoders (SD-H, UNet-H) and classifiers (MGC-A, global pooling).

``build_seg_head`` / ``build_cls_head`` map the config's ``type`` to a class; the keyword arguments
are stored in the checkpoint config, so a head is rebuilt from its config alone.
"""
from __future__ import annotations

from torch import nn

from .classifiers import GAPClassifier, MGCAClassifier
from .sd_head import SDHead
from .unet_head import UNetHead

SEG_HEADS = {"sd-h": SDHead, "unet-h": UNetHead}
CLS_HEADS = {"mgc-a": MGCAClassifier, "gap": GAPClassifier}


def _build(registry: dict, kind: str, cfg: dict, **context) -> nn.Module:
    cfg = dict(cfg)
    name = cfg.pop("type", None)
    if name not in registry:
        raise ValueError(f"unknown {kind} head {name!r}; known: {', '.join(registry)}")
    return registry[name](**context, **cfg)


def build_seg_head(cfg: dict, embed_dim: int, skip_channels: list[int], skip_scales: list[int]) -> nn.Module:
    ctx = {"embed_dim": embed_dim}
    if cfg.get("type") == "unet-h":
        ctx.update(skip_channels=skip_channels, skip_scales=skip_scales)
    return _build(SEG_HEADS, "segmentation", cfg, **ctx)


def build_cls_head(cfg: dict, embed_dim: int, num_classes: int) -> nn.Module:
    return _build(CLS_HEADS, "classification", cfg, embed_dim=embed_dim, num_classes=num_classes)
