"""The files a run writes, per output format, and the names it gives them.

Output formats
--------------
``gc`` (Grand Challenge)::

    OUT/images/breast-lesion-segmentation/<name>.mha   uint8 {0,1}, the input's geometry
    OUT/results.json                                   one entry per input (evalutils' lists)
    OUT/breast-lesion-classification.json              only with exactly one input: {"label", "probabilities"}
    OUT/malignancy-likelihood.json                     only with exactly one input: P(malignant), a bare float

    A one-task run's results.json entries also list the other task's output of the same input (the
    same path, given relative or absolute) that the results.json an earlier run left in the folder
    lists (``-t seg`` then ``-t cls``, or the reverse).

``pace`` (PACE challenge)::

    OUT/segmentation/<name>_mask.png                   uint8 {0,255}, the input's width x height as shown
                                                       (EXIF orientation applied: 90 degrees swaps them)
    OUT/classification/predictions.csv                 image_id,label   (Normal|Benign|Malignant)
    OUT/classification/probabilities.csv               image_id,normal,benign,malignant

``codabench`` (PACE's validation phase on Codabench: the upload is ``submission.zip``)::

    OUT/segmentation/<name>_mask.png                   as ``pace``
    OUT/classification.csv                             image_id,label   (Normal|Benign|Malignant)
    OUT/submission.zip                                 classification.csv and segmentation/, nothing else

All: ``OUT/errors.csv`` (``file,reason``; only when some case failed, a stale one is removed);
with ``overlay=True``, ``OUT/overlays/<name>.png`` (the image, the lesion contour in red, the label
and its probability); with ``--logits`` (``run(logits=True)``), ``OUT/logits/<name>.npy``
(float16 lesion logits, the mask's height x width: their sigmoid is the lesion probability, and the
mask is where they exceed the threshold's logit, 0 at 0.5). Task ``seg`` writes only the
segmentation outputs (logits among them), ``cls`` only the classification outputs.

Output names
------------
``<name>`` is the input's file stem (``case1.png`` -> ``case1``, ``case_0000.nii.gz`` -> ``case_0000``;
the PACE ``image_id``); a DICOM file listed by its content keeps its whole name
(``1.2.840.113619.2.55.7``, ``IM00001``). When two inputs would get the same name (compared
case-insensitively: ``a.png`` and ``a.jpg``, or ``x/a.png`` and ``y/a.png``), the inputs are taken in
sorted order of their path relative to the input folder and each gets the first free name among:
``<stem>``, ``<folders>_<stem>`` (inputs in a sub-folder only), ``<stem>_<ext>``,
``<folders>_<stem>_<ext>``, then ``<stem>_<ext>_2``, ``_3``, ... (``<ext>``: the suffix in lower case
without the dot, ``nii_gz`` for ``.nii.gz``; ``<folders>``: the relative folder path
joined with ``_``). So ``a.jpg`` -> ``a`` and ``a.png`` -> ``a_png``; ``x/a.png`` -> ``a`` and
``y/a.png`` -> ``y_a``. The same set of inputs always gives the same names, whatever the order
in which they are listed. A name longer than ``MAX_NAME_BYTES`` (UTF-8), which with ``_mask.png``
would pass the file system's 255-byte limit, is cut and ends in ``_`` and 8 hex digits of its
SHA-256 instead, so that it stays distinct and the same from run to run.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import CLASS_NAMES
from .atomic_files import remove_file, undo, write_npy, write_png, write_text, write_zip
from .image import IMAGE_SUFFIXES, LoadedImage, image_stem, image_suffix, printable
from .itk_image import write_itk
from .overlay import render_overlay

LOGITS_DIR = "logits"  # --logits (process.py, training.predict): <name>.npy, float16 lesion logits at full size
GC_SEGMENTATION_SLUG = "breast-lesion-segmentation"
GC_CLASSIFICATION_FILE = "breast-lesion-classification.json"
GC_LIKELIHOOD_FILE = "malignancy-likelihood.json"
ERRORS_FILE = "errors.csv"
# what runs write a file per image into
OUTPUT_IMAGE_FOLDERS = (f"images/{GC_SEGMENTATION_SLUG}", "segmentation", "overlays", LOGITS_DIR)


def output_folders(fmt: str, task: str, overlay: bool, logits: bool = False) -> list[str]:
    """The folders below the output folder that a run of this format, task, overlay and logits writes files into."""
    folders = []
    if task in ("all", "seg"):
        folders.append(f"images/{GC_SEGMENTATION_SLUG}" if fmt == "gc" else "segmentation")
        if logits:
            folders.append(LOGITS_DIR)
    if task in ("all", "cls") and fmt == "pace":
        folders.append("classification")
    if overlay:
        folders.append("overlays")
    return folders


PACE_LABELS, PACE_PROBABILITIES = "classification/predictions.csv", "classification/probabilities.csv"
CODABENCH_LABELS, CODABENCH_ZIP = "classification.csv", "submission.zip"
# classification files that a run with task seg does not write, so an earlier run's would stand beside its masks
CLASSIFICATION_FILES = (PACE_LABELS, PACE_PROBABILITIES, CODABENCH_LABELS)


@dataclass
class Case:
    path: Path  # the input file
    rel: str  # its path relative to the input folder (posix)
    name: str  # output name (see ``output_names``)
    prediction: object | None = None  # model.predictor.Prediction
    error: str | None = None
    outputs: list[Path] = field(default_factory=list)  # files written for this case (absolute)

    @property
    def ok(self) -> bool:
        return self.prediction is not None and self.error is None

    def fail(self, reason: str) -> None:
        """Mark the case failed; a failed case leaves no partial outputs behind: within
        ``atomic_files.replacements_kept`` (a run), what its files replaced comes back (``undo``)."""
        self.error, self.prediction = reason, None
        for path in self.outputs:
            with contextlib.suppress(OSError):
                undo(path)
        self.outputs.clear()


def relative_path(path: Path, root: Path) -> Path:
    """``path`` relative to ``root``, or its bare name when it is not below it."""
    try:
        return path.relative_to(root)
    except ValueError:
        return Path(path.name)


MAX_NAME_BYTES = 236  # + "_mask.png" = 245 bytes, under the 255 most file systems allow


def fit_name(name: str) -> str:
    """``name``, or where longer than ``MAX_NAME_BYTES`` its start and a digest of the whole."""
    data = name.encode("utf-8", "surrogateescape")
    if len(data) <= MAX_NAME_BYTES:
        return name
    head = data[:MAX_NAME_BYTES - 9].decode("utf-8", "ignore")  # whole characters only
    return f"{head}_{hashlib.sha256(data).hexdigest()[:8]}"


def output_names(paths: Sequence[Path], root: str | Path) -> list[str]:
    """Distinct, deterministic output names for ``paths`` (see the module docstring for the rule)."""
    root = Path(root)
    rels = [relative_path(Path(p), root) for p in paths]
    order = sorted(range(len(rels)), key=lambda i: rels[i].as_posix())
    taken: set[str] = set()
    names: list[str] = [""] * len(rels)
    for i in order:
        rel = rels[i]
        suffix = image_suffix(rel)  # not in IMAGE_SUFFIXES: a DICOM file named by a UID (the suffix is its own)
        stem, ext = image_stem(rel), suffix.lstrip(".").replace(".", "_") if suffix in IMAGE_SUFFIXES else ""
        folders = "_".join(rel.parent.parts)
        candidates = [stem] + [f"{folders}_{stem}"] * bool(folders) + [f"{stem}_{ext}"] * bool(ext) \
            + [f"{folders}_{stem}_{ext}"] * bool(folders and ext)
        k = 2
        while True:
            free = [c for c in map(fit_name, candidates) if c.casefold() not in taken]
            if free:
                break
            candidates = [f"{stem}_{ext}_{k}" if ext else f"{stem}_{k}"]
            k += 1
        names[i] = free[0]
        taken.add(free[0].casefold())
    return names


def _csv_text(header: Sequence[str], rows: list[Sequence]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _json_text(obj) -> str:
    return json.dumps(obj, indent=2) + "\n"


class _Writer:
    """Writes one case's files (``write_case``) and the run's summary files (``finish``)."""

    def __init__(self, out: Path, task: str, overlay: bool):
        self.out = out
        self.seg = task in ("all", "seg")
        self.cls = task in ("all", "cls")
        self.overlay = overlay
        # set by finish: how many of this run's inputs its summary lists with the other task's output
        # that an earlier run left (a one-task run beside the other task's; logged by model.inference.run)
        self.carried = 0

    def logits_path(self, case: Case) -> Path:
        return self.out / LOGITS_DIR / f"{case.name}.npy"

    def write_case(self, case: Case, image: LoadedImage, pred) -> None:
        if self.seg:  # --logits: for ensembling and for training.evaluate's segmentation BCE (not kept in memory after)
            logits = getattr(pred, "extra", {}).pop("logits", None)
            path = self.logits_path(case)
            if logits is not None:
                write_npy(path, logits)
                case.outputs.append(path)
            elif path.parent.is_dir():  # an earlier run's logits must not stand beside (or be scored against)
                path.unlink(missing_ok=True)  # this run's mask; a file named logits is no earlier run's folder
        if self.overlay:
            path = self.out / "overlays" / f"{case.name}.png"
            ov = render_overlay(image.array, pred.mask if self.seg else None,
                                pred.label if self.cls else None, pred.probabilities if self.cls else None)
            write_png(path, ov)
            case.outputs.append(path)

    def finish(self, cases: list[Case]) -> None:
        self.write_errors(cases)

    def summary_files(self) -> list[Path]:
        """The summary files ``finish`` writes before errors.csv (``model.inference.run`` puts them in
        place all together or none: a run whose summary cannot be written has failed every case, and
        none may stand as if it had not; an earlier run's stay as they were)."""
        return []

    def write_errors(self, cases: list[Case]) -> None:
        """errors.csv for the failed cases; none when nothing failed (an earlier run's is removed)."""
        errors = self.out / ERRORS_FILE
        failed = [c for c in cases if not c.ok]
        if failed:
            write_text(errors, _csv_text(("file", "reason"), [(c.rel, c.error) for c in failed]))
        elif errors.is_file():
            remove_file(errors)  # from an earlier run into the same folder


def _input_key(path: str) -> str:
    """An input path as results.json prints it, made absolute and normal, so that the same input given as
    ``-i in`` by one run and ``-i /abs/in`` (or ``./in``) by the other is one input (relative paths are
    taken from the current folder, where the earlier run most likely stood)."""
    return os.path.normpath(os.path.abspath(path))


class GCWriter(_Writer):
    def mask_path(self, case: Case) -> Path:
        return self.out / "images" / GC_SEGMENTATION_SLUG / f"{case.name}.mha"

    def write_case(self, case: Case, image: LoadedImage, pred) -> None:
        if self.seg:
            path = self.mask_path(case)
            write_itk(path, pred.mask.astype(np.uint8), like=image)
            case.outputs.append(path)
        super().write_case(case, image, pred)

    def entry(self, case: Case, earlier: dict | None = None) -> dict:
        """The case's results.json entry; ``earlier``: the other task's outputs that an earlier one-task
        run listed, by input path (``earlier_outputs``), added where this run's case succeeded."""
        outputs = []
        if case.ok:
            pred = case.prediction
            kept = (earlier or {}).get(_input_key(printable(case.path)))
            if self.seg:
                outputs.append({"type": "mask", "filename": self.mask_path(case).relative_to(self.out).as_posix()})
            elif kept and kept["filename"] == self.mask_path(case).relative_to(self.out).as_posix():
                outputs.append(kept)
            if self.cls:
                outputs.append({"type": "classification", "label": pred.label,
                                "probabilities": {k: float(pred.probabilities[k]) for k in CLASS_NAMES}})
            elif kept:
                outputs.append(kept)
        return {"inputs": [{"image": {"name": printable(case.path.name)}, "path": printable(case.path)}],
                "outputs": outputs, "error_messages": [] if case.ok else [f"{case.rel}: {case.error}"]}

    def earlier_outputs(self) -> dict:
        """For a one-task run (the PACE template's ``-t seg`` and ``-t cls`` runs into one folder): the
        other task's output that the results.json an earlier run left lists for each input path (keyed by
        ``_input_key``), where
        it is whole (a mask file that is still there, a classification naming a class with all three
        probabilities), so that the second run's results.json lists both tasks, as one run of both does."""
        if self.seg and self.cls:
            return {}
        try:
            old = json.loads((self.out / "results.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        found = {}
        for entry in old if isinstance(old, list) else []:
            try:
                path = entry["inputs"][0]["path"]
                outputs = entry["outputs"]
            except (KeyError, IndexError, TypeError):
                continue
            for out in outputs if isinstance(outputs, list) else []:
                if not isinstance(out, dict) or not isinstance(path, str):
                    continue
                if self.seg and out.get("type") == "classification" and out.get("label") in CLASS_NAMES \
                        and isinstance(out.get("probabilities"), dict) \
                        and set(out["probabilities"]) == set(CLASS_NAMES) \
                        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
                                for v in out["probabilities"].values()):  # NaN fails 0 <= v
                    found[_input_key(path)] = {"type": "classification", "label": out["label"],
                                   "probabilities": {k: float(out["probabilities"][k]) for k in CLASS_NAMES}}
                elif self.cls and out.get("type") == "mask" and isinstance(out.get("filename"), str) \
                        and (self.out / out["filename"]).is_file():
                    found[_input_key(path)] = {"type": "mask", "filename": out["filename"]}
        return found

    def summary_files(self) -> list[Path]:
        return [self.out / "results.json", self.out / GC_CLASSIFICATION_FILE, self.out / GC_LIKELIHOOD_FILE]

    def finish(self, cases: list[Case]) -> None:
        results, label_file, likelihood_file = self.summary_files()
        earlier = self.earlier_outputs()
        entries = [self.entry(c, earlier) for c in cases]
        self.carried = sum(len(e["outputs"]) > 1 for e in entries) if not (self.seg and self.cls) else 0
        write_text(results, _json_text(entries))
        answer = [o for o in entries[0]["outputs"] if o["type"] == "classification"] if len(cases) == 1 else []
        if answer:  # this run's classification, or (-t seg) the one an earlier -t cls run made of this input
            probs = answer[0]["probabilities"]
            write_text(label_file, _json_text({"label": answer[0]["label"], "probabilities": probs}))
            write_text(likelihood_file, _json_text(probs["malignant"]))
        else:  # an earlier one-input run's answer must not stand beside this run's results.json
            for path in (label_file, likelihood_file):
                remove_file(path)
        super().finish(cases)


class PACEWriter(_Writer):
    def mask_path(self, case: Case) -> Path:
        return self.out / "segmentation" / f"{case.name}_mask.png"

    def write_case(self, case: Case, image: LoadedImage, pred) -> None:
        if self.seg:
            path = self.mask_path(case)
            write_png(path, (pred.mask > 0).astype(np.uint8) * 255)
            case.outputs.append(path)
        super().write_case(case, image, pred)

    @staticmethod
    def labels_csv(cases: list[Case]) -> str:
        return _csv_text(("image_id", "label"), [(c.name, c.prediction.label.capitalize()) for c in cases if c.ok])

    def summary_files(self) -> list[Path]:
        return [self.out / PACE_LABELS, self.out / PACE_PROBABILITIES] if self.cls else []

    def finish(self, cases: list[Case]) -> None:
        if self.cls:
            probs = [(c.name, *(f"{float(c.prediction.probabilities[k]):.6f}" for k in CLASS_NAMES))
                     for c in cases if c.ok]
            labels, probabilities = self.summary_files()
            write_text(labels, self.labels_csv(cases))
            write_text(probabilities, _csv_text(("image_id", *CLASS_NAMES), probs))
        super().finish(cases)


class CodabenchWriter(PACEWriter):
    """PACE's validation-phase upload: ``classification.csv`` beside ``segmentation/``, and both in
    ``submission.zip`` (entries in sorted order with a fixed date: the same predictions give the
    same bytes). A one-task run's zip also holds the other task's files of its own images that an
    earlier run left (the template's ``-t seg`` and ``-t cls`` runs into one folder): its masks
    named after them, or a classification.csv that lists none but them."""

    def summary_files(self) -> list[Path]:
        return ([self.out / CODABENCH_LABELS] if self.cls else []) + [self.out / CODABENCH_ZIP]

    def finish(self, cases: list[Case]) -> None:
        *labels, archive = self.summary_files()  # classification.csv where the run classifies
        members: dict[str, Path | bytes] = {}
        for path in labels:
            text = self.labels_csv(cases)
            write_text(path, text)
            members[path.name] = text.encode("utf-8")  # within all_or_none, not yet in place
        # the other task's files of a one-task run's own images (the template's -t seg and -t cls runs into
        # one folder), as stale_outputs counts them: the second run's zip holds both tasks
        # (an earlier run's file, not a link: the zip would hold whatever it points to)
        labels_file = self.out / CODABENCH_LABELS
        listed = _listed_ids(labels_file) if not self.cls and not labels_file.is_symlink() else set()
        if listed and listed <= {c.name for c in cases}:
            members[CODABENCH_LABELS] = labels_file
            self.carried = len(listed)
        for c in cases:
            earlier = self.mask_path(c).is_file() and not self.mask_path(c).is_symlink()
            if c.ok and (self.seg or earlier):
                members[self.mask_path(c).relative_to(self.out).as_posix()] = self.mask_path(c)
                self.carried += not self.seg
        write_zip(archive, members)
        _Writer.finish(self, cases)  # not PACEWriter's: Codabench takes no predictions.csv / probabilities.csv


WRITERS = {"gc": GCWriter, "pace": PACEWriter, "codabench": CodabenchWriter}


def stale_outputs(out: Path, cases: Sequence[Case], task: str = "all", writer: _Writer | None = None) -> list[Path]:
    """Files in the output's mask, overlay and logits folders that this run did not write, and, when
    the run wrote no classification (task ``seg``), the classification files an earlier run left.

    The PACE template runs ``main.py -t seg`` and ``-t cls`` into one output folder, so a one-task run
    does not count the other task's files for its own images: with ``writer`` (this run's), the masks
    and logits named after its inputs beside a ``-t cls`` run, and beside a ``-t seg`` run
    classification files that list none but its inputs."""
    written = {p.resolve() for case in cases for p in case.outputs}
    if task == "cls" and writer is not None:
        written |= {p.resolve() for c in cases for p in (writer.mask_path(c), writer.logits_path(c))}
    found = []
    for sub in OUTPUT_IMAGE_FOLDERS:
        if (out / sub).is_dir():
            # not another live run's hidden files (a killed run's were removed when this run began)
            found += [p for p in (out / sub).rglob("*")
                      if p.is_file() and p.resolve() not in written and not p.name.startswith(".pfsam-")]
    if task == "seg":
        names = {c.name for c in cases} if writer is not None else set()
        found += [out / name for name in CLASSIFICATION_FILES
                  if (out / name).is_file() and not _lists_only(out / name, names)]
    return sorted(found)


def _listed_ids(path: Path) -> set[str]:
    """The images (``image_id``) that the classification CSV ``path`` lists; none where it cannot be read."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return {row["image_id"] for row in csv.DictReader(fh)}
    except (OSError, UnicodeDecodeError, KeyError, csv.Error):
        return set()


def _lists_only(path: Path, names: set[str]) -> bool:
    """Whether the classification CSV ``path`` names images (``image_id``) and only those in ``names``."""
    ids = _listed_ids(path)
    return bool(ids) and ids <= names
