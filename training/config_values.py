"""The values of a training config that ``training.config.check_config`` checks beyond its keys: the
encoder, the heads and their options, the views, the numbers (learning rate, loss weights, curriculum,
class weights), each refused with the key and what it takes before anything is built or written."""
from __future__ import annotations

import inspect
import math

from model.encoders import ENCODERS
from model.heads import CLS_HEADS, SEG_HEADS

from .augment import VIEWS

# the heads' keyword arguments that the network gives (model/network.py), not the config
HEAD_CONTEXT = {"self", "embed_dim", "skip_channels", "skip_scales", "num_classes"}
# (section, key, lowest, whether the lowest is allowed, highest or None, what to give)
NUMBERS = (("optim", "lr", 0, False, None, "a positive finite number"),
           ("optim", "weight_decay", 0, True, None, "a finite number of at least 0"),
           ("loss", "seg_weight", 0, True, None, "a finite number of at least 0"),
           ("loss", "cls_weight", 0, True, None, "a finite number of at least 0"),
           ("loss", "eps", 0, False, None, "a positive finite number"),
           ("curriculum", "p_gt", 0, True, 1, "a number from 0 to 1 (the share of ground-truth guide masks)"))


class ValueProblem(ValueError):
    """A config value training cannot use; ``training.config`` reports it as a ConfigError."""


def number(value) -> bool:
    """Whether ``value`` reads as a number (YAML's 1e-3, without a dot, is text); True/False do not."""
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def views_problem(views) -> str | None:
    """What is wrong with a list of views, or None: distinct known views, ``orig`` first (validation
    and the embedding cache's validation images read the first view alone)."""
    if not isinstance(views, list) or not views:
        return f"{views!r}: give a list of views from {', '.join(VIEWS)}, starting with orig"
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        return f"{views!r}: unknown view {unknown[0]!r}; allowed: {', '.join(VIEWS)}"
    if len(set(views)) < len(views):
        return f"{views!r}: a view is listed twice"
    if views[0] != "orig":
        return f"{views!r}: must start with orig (validation reads the first view, unaugmented)"
    return None


def _group_norm_width(value) -> bool:
    """A channel count GroupNorm(min(8, c), c) takes (model/heads): 1 to 7, or a multiple of 8."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0 and (value < 8 or value % 8 == 0)


def _check_head(section: str, head: dict, registry: dict) -> None:
    kind = head["type"]
    if kind not in registry:
        raise ValueProblem(f"config key model.{section}.type is {kind!r}; allowed: {', '.join(registry)}")
    params = {n: p.default for n, p in inspect.signature(registry[kind].__init__).parameters.items()
              if n not in HEAD_CONTEXT}
    for key, value in head.items():
        name = f"model.{section}.{key}"
        if key == "type":
            continue
        if key not in params:
            raise ValueProblem(f"unknown config key {name}; {kind} takes {', '.join(['type', *params])}")
        if key == "dropout":
            ok, want = number(value) and 0 <= float(value) < 1, "a number from 0 to below 1"
        elif key == "channels":  # their number sets the output grid: the training masks' 256 x 256
            n = len(params[key])
            ok = isinstance(value, list) and len(value) == n and all(map(_group_norm_width, value))
            want = (f"{n} channel counts, e.g. {list(params[key])} ({kind} takes {n}; each 1 to 7 or a "
                    "multiple of 8)")
        elif key == "skip_dim":
            ok, want = _group_norm_width(value), "a channel count: 1 to 7 or a multiple of 8"
        else:  # hidden
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            want = "a positive whole number"
        if not ok:
            raise ValueProblem(f"config key {name} is {value!r}: give {want}")


def check_values(cfg: dict) -> None:
    """ValueProblem for the first value of ``cfg`` (keys already checked) training cannot use."""
    encoder = cfg["model"]["encoder"]
    if encoder not in ENCODERS:
        raise ValueProblem(f"config key model.encoder is {encoder!r}; allowed: {', '.join(ENCODERS)}")
    _check_head("seg_head", cfg["model"]["seg_head"], SEG_HEADS)
    _check_head("cls_head", cfg["model"]["cls_head"], CLS_HEADS)
    problem = views_problem(cfg["views"])
    if problem:
        raise ValueProblem(f"config key views is {problem}")
    for section, key, low, low_ok, high, want in NUMBERS:
        if key in cfg[section]:
            value = cfg[section][key]
            x = float(value) if number(value) else math.nan
            if not math.isfinite(x) or x < low or (x == low and not low_ok) or (high is not None and x > high):
                raise ValueProblem(f"config key {section}.{key} is {value!r}: give {want}")
    if float(cfg["loss"]["seg_weight"]) == float(cfg["loss"]["cls_weight"]) == 0:
        raise ValueProblem("config keys loss.seg_weight and loss.cls_weight are both 0: nothing would train")
    c = cfg["curriculum"]
    for key in ("gt_until", "mixed_until"):
        if not isinstance(c[key], int) or isinstance(c[key], bool) or c[key] < 0:
            raise ValueProblem(f"config key curriculum.{key} is {c[key]!r}: give a whole number of epochs, at least 0")
    if c["gt_until"] > c["mixed_until"]:
        raise ValueProblem(f"config keys curriculum.gt_until ({c['gt_until']}) and curriculum.mixed_until "
                           f"({c['mixed_until']}): the ground-truth phase must end no later than the mixed one "
                           "(gt_until <= mixed_until)")
    for name, weight in (cfg.get("class_weights") or {}).items():  # 0 would train, and the ensemble not load
        if not number(weight) or not 0 < float(weight) < math.inf:
            raise ValueProblem(f"config key class_weights.{name} is {weight!r}: give a positive finite number "
                               "(each image is drawn in proportion to its class's weight)")
