"""Reading a folder of predictions, as ``training.evaluate`` scores it: the PACE layout
(``segmentation/<id>_mask.png``, ``classification/predictions.csv`` and ``probabilities.csv``) or the
Grand Challenge layout (``results.json``, ``images/breast-lesion-segmentation/*.mha``), detected from
the folder; and the lesion logits ``training.predict --logits`` writes (``logits/<id>.npy``).
Every reader returns {case id: {"mask", "label", "probabilities"}} and the problems it met."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from model import CLASS_NAMES
from model.image import image_stem
from model.io import is_image_file
from model.writers import CODABENCH_LABELS

from . import metrics as M
from .datasets import read_csv

GC_MASK_DIR = Path("images") / "breast-lesion-segmentation"


def detect_layout(pred_dir: Path | str) -> str:
    """``"grand-challenge"``, ``"pace"`` or ``"codabench"`` (PACE's masks, the labels alone in
    classification.csv: ``process.py --format codabench``); ValueError when none is recognised."""
    pred_dir = Path(pred_dir)
    if (pred_dir / "results.json").is_file() or (pred_dir / GC_MASK_DIR).is_dir():
        return "grand-challenge"
    if (pred_dir / CODABENCH_LABELS).is_file() and not (pred_dir / "classification").is_dir():
        return "codabench"
    if (pred_dir / "segmentation").is_dir() or (pred_dir / "classification").is_dir():
        return "pace"
    raise ValueError(f"{pred_dir}: neither the PACE layout (segmentation/, classification/), the Codabench one "
                     f"(segmentation/, {CODABENCH_LABELS}) nor the Grand Challenge one (results.json, {GC_MASK_DIR}/)")


def _new_entry() -> dict:
    return {"mask": None, "label": None, "probabilities": None}


def _parse_label(value: Any) -> str | None:
    try:
        k = M.class_index(value)
    except (ValueError, TypeError):
        return None
    return CLASS_NAMES[k] if k >= 0 else None


PROB_SUM_TOLERANCE = 1e-3


def _parse_probs(values: Mapping[str, Any]) -> list[float] | None:
    low = {str(k).strip().lower(): v for k, v in values.items()}
    try:
        p = [float(low[c]) for c in CLASS_NAMES]
    except (KeyError, TypeError, ValueError):
        return None
    if not all(math.isfinite(x) and x >= 0 for x in p) or abs(sum(p) - 1.0) > PROB_SUM_TOLERANCE:
        return None  # probabilities: none negative, summing to 1 (10,20,70 would score a perfect log loss)
    return p


def read_pace(pred_dir: Path | str) -> tuple[dict[str, dict], list[dict]]:
    """{image_id: {mask: Path|None, label: str|None, probabilities: [3]|None}} and the problems found; the
    Codabench layout too (its labels in classification.csv; it holds no probabilities)."""
    pred_dir = Path(pred_dir)
    preds: dict[str, dict] = {}
    problems: list[dict] = []
    seg = pred_dir / "segmentation"
    if seg.is_dir():
        for p in sorted(seg.iterdir()):
            if p.is_file() and p.name.endswith("_mask.png") and not p.name.startswith("."):
                preds.setdefault(p.name[: -len("_mask.png")], _new_entry())["mask"] = p
    cls = pred_dir / "classification"
    files = (("predictions.csv", "label"), ("probabilities.csv", "probabilities"))
    if not cls.is_dir() and (pred_dir / CODABENCH_LABELS).is_file():
        cls, files = pred_dir, ((CODABENCH_LABELS, "label"),)
    for name, key in files:
        path = cls / name
        if not path.is_file():
            continue
        for row in read_csv(path, ("image_id",)):  # without the column every row would be "missing"
            cid = row.get("image_id", "")
            if not cid:
                continue
            value = _parse_label(row.get("label")) if key == "label" else _parse_probs(row)
            if value is None:
                problems.append({"image_id": cid, "problem": f"{name}: unusable row {row}"})
                continue
            entry = preds.setdefault(cid, _new_entry())
            if entry[key] is not None:
                problems.append({"image_id": cid, "problem": f"{name}: duplicate row, first one kept"})
                continue
            entry[key] = value
    return preds, problems


def _walk(obj: Any, key: str | None = None) -> Iterator[tuple[str | None, Any]]:
    """(key, value) for every value nested in dicts and lists, depth first, in order."""
    yield key, obj
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _walk(v, str(k))
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v, key)


def _stem(name: str) -> str:
    """A file name's case id as process.py names its outputs (``model.image.image_stem``): the image
    suffix off (``.nii.gz`` whole, any case), a name without one (a DICOM UID) kept whole."""
    return image_stem(Path(name.replace("\\", "/")).name)


def _gc_case_id(entry: Mapping) -> str | None:
    inputs = entry.get("inputs", [])
    names = [v for k, v in _walk(inputs) if k == "name" and isinstance(v, str)]
    names += [v for k, v in _walk(inputs) if isinstance(v, str) and is_image_file(Path(v))]
    return _stem(names[0]) if names else None


def read_grand_challenge(pred_dir: Path | str) -> tuple[dict[str, dict], list[dict]]:
    """The Grand Challenge layout as ``read_pace`` returns the PACE one (leniently, see the module doc)."""
    pred_dir = Path(pred_dir)
    mask_dir = pred_dir / GC_MASK_DIR
    preds: dict[str, dict] = {}
    problems: list[dict] = []
    referenced: set[Path] = set()
    results = pred_dir / "results.json"
    entries: list = []
    if results.is_file():
        try:
            entries = json.loads(results.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problems.append({"image_id": None, "problem": f"results.json is not valid JSON ({exc})"})
        if isinstance(entries, Mapping):
            entries = [entries]
        if not isinstance(entries, list):
            problems.append({"image_id": None, "problem": "results.json is not a list of entries"})
            entries = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            problems.append({"image_id": None, "problem": f"results.json entry {i} is not an object"})
            continue
        cid = _gc_case_id(entry)
        if not cid:
            problems.append({"image_id": None, "problem": f"results.json entry {i}: no input file name"})
            continue
        if cid in preds:
            problems.append({"image_id": cid, "problem": f"results.json entry {i}: duplicate case, first one kept"})
            continue
        entry_out = _new_entry()
        outputs = entry.get("outputs", [])
        for k, v in _walk(outputs):
            if entry_out["probabilities"] is None and isinstance(v, Mapping):
                if set(CLASS_NAMES) <= {str(x).strip().lower() for x in v}:
                    entry_out["probabilities"] = _parse_probs(v)
            if entry_out["label"] is None and k in ("label", "class", "prediction") and isinstance(v, (str, int)) \
                    and not isinstance(v, bool):
                entry_out["label"] = _parse_label(v)
            if entry_out["mask"] is None and isinstance(v, str) and is_image_file(Path(v)):
                for cand in (pred_dir / v, mask_dir / Path(v).name):
                    if cand.is_file():
                        entry_out["mask"] = cand
                        break
        if entry_out["mask"] is None and (mask_dir / f"{cid}.mha").is_file():
            entry_out["mask"] = mask_dir / f"{cid}.mha"
        if entry_out["mask"] is not None:
            referenced.add(entry_out["mask"].resolve())
        if entry.get("error_messages"):
            problems.append({"image_id": cid, "problem": f"error_messages: {entry['error_messages']}"})
        preds[cid] = entry_out
    if mask_dir.is_dir():
        for p in sorted(mask_dir.iterdir()):
            if p.is_file() and is_image_file(p) and p.resolve() not in referenced:
                cid = _stem(p.name)
                if cid in preds:
                    problems.append({"image_id": cid, "problem": f"{p.name} not named in results.json; ignored"})
                else:
                    preds[cid] = {**_new_entry(), "mask": p}
    return preds, problems


class ProbabilityMaps(Mapping):
    """Lesion probabilities from a folder of ``<id>.npy`` logits, read when asked for (no pickle)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __getitem__(self, cid: str) -> np.ndarray:
        path = self.folder / f"{cid}.npy"
        if not path.is_file():
            raise KeyError(cid)
        try:
            logits = np.load(path, allow_pickle=False).astype(np.float64)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{path}: not readable lesion logits ({exc})") from None
        return 1.0 / (1.0 + np.exp(-logits))

    def __iter__(self) -> Iterator[str]:
        return (p.stem for p in sorted(self.folder.glob("*.npy")))

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*.npy"))
