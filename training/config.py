"""A training config: the YAML file with the command line's overrides, checked against the keys training
reads before anything is built or written (training/configs/*.yaml hold them all)."""
from __future__ import annotations

import datetime
import re
from pathlib import Path

import yaml

from model import CLASS_NAMES
from model.network import ENCODER_MODES

from .config_values import ValueProblem, check_values


def load_config(path: str | Path, overrides: dict) -> dict:
    """The config file with ``overrides`` (dotted keys; None = keep) applied. When the number of
    epochs is overridden and the curriculum is not, the curriculum's boundaries are scaled with it
    (the paper's 20/40 of 60 epochs become 10/20 of 30), so every phase keeps its share of the run,
    rounded to whole epochs (at 2 epochs the mixed phase rounds to none: 1/1 of 2)."""
    try:
        cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not a readable YAML config ({' '.join(str(exc).split())})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: not a config (a mapping of keys to values) but "
                          f"{'an empty file' if cfg is None else repr(cfg)[:80]}")
    file_epochs = cfg.get("epochs")
    for key, value in overrides.items():
        if value is None:
            continue
        node = cfg
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {'.'.join(parts[:i + 1])} is {node!r} in {path}, not a section of keys")
        node[parts[-1]] = value
    bounds = ("gt_until", "mixed_until")
    given = {b for b in bounds for k, v in overrides.items() if v is not None and (
        k == f"curriculum.{b}" or (k == "curriculum" and isinstance(v, dict) and b in v))}  # p_gt alone sets none
    cur = cfg.get("curriculum")
    scalable = isinstance(cur, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (
        cfg.get("epochs"), file_epochs, cur.get("gt_until"), cur.get("mixed_until")))  # else check_config says why
    if scalable and file_epochs and len(given) < 2 and int(cfg["epochs"]) != int(file_epochs):
        # the boundaries not given scale with the epochs, each on its own side of one that is given
        scale = int(cfg["epochs"]) / int(file_epochs)
        new = {**cur, **{b: int(cur[b] * scale + 0.5) for b in bounds if b not in given}}
        if "mixed_until" in given:
            new["gt_until"] = min(new["gt_until"], new["mixed_until"])
        if "gt_until" in given:
            new["mixed_until"] = max(new["mixed_until"], new["gt_until"])
        cfg["curriculum"] = new
    return _plain(cfg)


class ConfigError(ValueError):
    """A config that cannot be trained as it is; the message names the file or key and the reason."""


# The keys training reads (training/configs/*.yaml use them all but the optional ones marked).
CONFIG_SCHEMA = {
    "variant": None, "model": {"encoder", "mode", "seg_head", "cls_head",
                               "encoder_checkpoint", "encoder_weights"},  # the last two optional
    "loss": {"seg_weight", "cls_weight", "eps"}, "optim": {"lr", "weight_decay", "scheduler"},
    "epochs": None, "batch_size": None, "curriculum": {"gt_until", "mixed_until", "p_gt"}, "views": None,
    "class_weights": set(CLASS_NAMES), "select": None, "seed": None, "augment": None,
}
REQUIRED = {"model": {"encoder", "mode", "seg_head", "cls_head"}, "loss": {"seg_weight", "cls_weight", "eps"},
            "optim": {"lr"}, "epochs": None, "batch_size": None, "curriculum": {"gt_until", "mixed_until"},
            "views": None, "seed": None}
SELECT_METRICS = ("val_dsc", "val_acc", "val_auc")  # computed every epoch (evaluate_epoch); higher is better
AUGMENT_MODES = ("random", "fixed")
CHOICES = {("optim", "scheduler"): ("constant", "cosine"), ("augment",): AUGMENT_MODES, ("model", "mode"): ENCODER_MODES}


def check_config(cfg) -> list[str]:
    """ConfigError for a config training cannot run as asked: a key missing, a key in a section that
    training does not read (``optim.lrr``), a top-level key that looks like a misspelt one
    (``batchsize``), a value outside its choices, ``select`` not a metric the run computes, a value
    training cannot use (``training.config_values``: encoder, heads, views, numbers). Returns
    the other top-level keys (notes of the user's: kept in config.yaml, not used)."""
    import difflib

    if not isinstance(cfg, dict):
        raise ConfigError(f"the config is not a mapping of keys to values but {type(cfg).__name__}")
    unused = []
    for key, value in cfg.items():
        if key not in CONFIG_SCHEMA:
            close = difflib.get_close_matches(str(key), CONFIG_SCHEMA, n=1, cutoff=0.75)
            if close:
                raise ConfigError(f"unknown config key {key!r}: did you mean {close[0]!r}?")
            unused.append(str(key))
            continue
        allowed = CONFIG_SCHEMA[key]
        if allowed is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must hold keys ({', '.join(sorted(allowed))}), not {value!r}")
        for sub in value:
            if sub not in allowed:
                close = difflib.get_close_matches(str(sub), allowed, n=1, cutoff=0.6)
                raise ConfigError(f"unknown config key {key}.{sub}" + (f": did you mean {key}.{close[0]}?" if close
                                  else f"; {key} takes {', '.join(sorted(allowed))}"))
    for key, subs in REQUIRED.items():
        if key not in cfg:
            raise ConfigError(f"config key {key!r} is missing")
        missing = sorted(subs - set(cfg[key])) if subs else []
        if missing:
            raise ConfigError(f"config key {key}.{missing[0]} is missing")
    for path, choices in CHOICES.items():
        node = cfg
        for p in path[:-1]:
            node = node.get(p, {})
        if path[-1] in node and node[path[-1]] not in choices:
            raise ConfigError(f"config key {'.'.join(path)} is {node[path[-1]]!r}; allowed: {', '.join(choices)}")
    for head in ("seg_head", "cls_head"):
        if not isinstance(cfg["model"][head], dict) or "type" not in cfg["model"][head]:
            raise ConfigError(f"config key model.{head} must hold its type, e.g. {{type: sd-h}}")
    if cfg.get("select", "val_dsc") not in SELECT_METRICS:
        raise ConfigError(f"config key select is {cfg['select']!r}: not a metric the run computes; "
                          f"allowed: {', '.join(SELECT_METRICS)}")
    for key, low in (("epochs", 0), ("batch_size", 1), ("seed", 0)):  # 0 epochs: the run's folder alone
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < low:
            raise ConfigError(f"config key {key} is {cfg[key]!r}: give a whole number of at least {low}")
    try:
        check_values(cfg)
    except ValueProblem as exc:
        raise ConfigError(str(exc)) from None
    return unused


def _plain(value):
    """YAML reads 2025-01-31 as a date; kept as text, since state.pt (loaded with weights_only=True)
    takes plain values only and a date in the config would make the run impossible to resume."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    return value


def config_error_origin(message: str, config_path, sets, options: dict[str, str] | None = None) -> str:
    """A config error named after where the bad value came from: the ``--set`` whose key (or a section
    above it) the message names, or the option (``options``: {dotted key: "--lr -1.0"}, those given)
    that set that key, else the config file."""
    def names(key: str) -> bool:
        return bool(re.search(rf"(?<![\w.]){re.escape(key.strip())}(?![\w])", message))

    named = [s for s in sets if names(s.partition("=")[0])]
    if named:
        return f"--set {' --set '.join(named)}: {message}"
    given = [flag for key, flag in (options or {}).items() if names(key)]
    if given:
        return f"{', '.join(given)}: {message}"
    return message if message.startswith(str(config_path)) else f"{config_path}: {message}"
