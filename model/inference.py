"""Batch inference over a folder, shared by ``process.py`` (Grand Challenge / PACE) and ``predict.py`` (Cog).

One run: find the images below the input folder (``model.io.list_images``), read them a batch at a
time, predict with the ensemble (``model.predictor.Predictor``), write each case's outputs as soon
as it is predicted, then the run's summary files. A case that cannot be read, predicted or written
is reported (stderr, ``errors.csv``, and ``error_messages`` in ``results.json``) and every other
case is still written. All files are written atomically through ``model.io``.

Output formats
--------------
``gc`` (Grand Challenge)::

    OUT/images/breast-lesion-segmentation/<name>.mha   uint8 {0,1}, the input's geometry
    OUT/results.json                                   one entry per input (evalutils form)
    OUT/breast-lesion-classification.json              only with exactly one input: {"label", "probabilities"}
    OUT/malignancy-likelihood.json                     only with exactly one input: P(malignant), a bare float

``pace`` (PACE challenge)::

    OUT/segmentation/<name>_mask.png                   uint8 {0,255}, the input's width x height
    OUT/classification/predictions.csv                 image_id,label   (Normal|Benign|Malignant)
    OUT/classification/probabilities.csv               image_id,normal,benign,malignant

``codabench`` (PACE's validation phase on Codabench: the upload is ``submission.zip``)::

    OUT/segmentation/<name>_mask.png                   as ``pace``
    OUT/classification.csv                             image_id,label   (Normal|Benign|Malignant)
    OUT/submission.zip                                 classification.csv and segmentation/, nothing else

All: ``OUT/errors.csv`` (``file,reason``; only when some case failed, a stale one is removed) and,
with ``overlay=True``, ``OUT/overlays/<name>.png`` (the image, the lesion contour in red, the label
and its probability). Task ``seg`` writes only the segmentation outputs, ``cls`` only the
classification outputs.

Output names
------------
``<name>`` is the input's file stem (``case1.png`` -> ``case1``; the PACE ``image_id``). When two
inputs would get the same name (compared case-insensitively: ``a.png`` and ``a.jpg``, or ``x/a.png``
and ``y/a.png``), the inputs are taken in sorted order of their path relative to the input folder
and each gets the first free name among: ``<stem>``, ``<folders>_<stem>`` (inputs in a
sub-folder only), ``<stem>_<ext>``, ``<folders>_<stem>_<ext>``, then ``<stem>_<ext>_2``, ``_3``, ...
(``<ext>``: the suffix in lower case without the dot; ``<folders>``: the relative folder path
joined with ``_``). So ``a.jpg`` -> ``a`` and ``a.png`` -> ``a_png``; ``x/a.png`` -> ``a`` and
``y/a.png`` -> ``y_a``. The same set of inputs always gives the same names, whatever the order
in which they are listed.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import CLASS_NAMES
from .io import (ImageReadError, LoadedImage, list_images, read_image, unlistable_reason, unwritable_reason,
                 write_mha, write_npy, write_png, write_text, write_zip)

TASKS = ("all", "seg", "cls")
FORMATS = ("gc", "pace", "codabench")
LOGITS_DIR = "logits"  # PACE layout, training.predict --logits: <name>.npy, float16 lesion logits at full size
GC_SEGMENTATION_SLUG = "breast-lesion-segmentation"
GC_CLASSIFICATION_FILE = "breast-lesion-classification.json"
GC_LIKELIHOOD_FILE = "malignancy-likelihood.json"
SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")  # where Grand Challenge mounts an uploaded model
ERRORS_FILE = "errors.csv"

EXIT_OK = 0
EXIT_NOTHING_DONE = 1
EXIT_SOME_FAILED = 3


class InferenceError(RuntimeError):
    """Nothing can be processed (no inputs, no model, no device); the message says why."""


# --------------------------------------------------------------------------------------------
# Model


def default_model_dir() -> Path:
    """The model to run when none is named: the upload at ``/opt/ml/model`` (Grand Challenge), else
    the ensemble shipped with the package (``model/weights/default``).

    An upload's ``ensemble.json`` (or, for a single model, its ``config.json``) may be at the top of
    ``/opt/ml/model`` or one folder down (a tarball packed with its folder). An upload that holds
    files but no model is an error, never a silent fall-back to the built-in model."""
    root = SAGEMAKER_MODEL_DIR
    if (root / "ensemble.json").is_file() or (root / "config.json").is_file():
        return root
    entries = sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []
    if entries:
        found = (sorted(p.parent for p in root.glob("*/ensemble.json"))
                 or sorted(p.parent for p in root.glob("*/config.json")))
        if len(found) == 1:
            return found[0]
        if found:
            raise InferenceError(f"{root} holds several ensembles ({', '.join(str(p) for p in found)}); "
                                 "upload one, or pass --model-dir")
        raise InferenceError(f"{root} holds {', '.join(entries[:5])}{' ...' if len(entries) > 5 else ''} but no "
                             "ensemble.json or config.json (at its top or one folder down): upload the folder "
                             "that training.export wrote, e.g. the model.tar.gz of ./export.sh")
    from .predictor import DEFAULT_MODEL_DIR

    return Path(DEFAULT_MODEL_DIR)


def load_predictor(model_dir: str | Path | None = None, device: str = "auto", batch_size: int = 4,
                   tta: bool = False, precision: str = "auto", compile_backend: str | None = None,
                   runtime: str = "auto"):
    """Load the ensemble once; any failure becomes an ``InferenceError`` naming the folder."""
    from .predictor import Predictor

    if model_dir is None:
        model_dir = default_model_dir()
        _log(f"model: {model_dir}" + (" (uploaded)" if model_dir.is_relative_to(SAGEMAKER_MODEL_DIR) else " (built in)"))
    model_dir = Path(model_dir)
    device = {"gpu": "cuda"}.get(device, device)
    from .predictor import resolve_device

    try:
        resolve_device(device)  # a device that is not there is not a model failure
    except RuntimeError as exc:
        raise InferenceError(str(exc)) from None
    if not model_dir.is_dir():  # only a named folder can be missing: the defaults are checked above
        raise InferenceError(f"cannot load the model: {model_dir} "
                             f"{'is a file, not a model folder' if model_dir.exists() else 'does not exist'}")
    try:
        predictor = Predictor.from_dir(model_dir, device=device, batch_size=batch_size, tta=tta,
                                       precision=precision, compile_backend=compile_backend, runtime=runtime)
    except Exception as exc:  # noqa: BLE001 - every reason is reported the same way
        raise InferenceError(f"cannot load the model from {model_dir}: {exc}") from exc
    from .encoders.sam_vit import fused_attention_note

    notes = {fused_attention_note(m.encoder, predictor.device) for m in predictor.members.values()} - {None}
    for note in sorted(notes):  # slower, not wrong: said once, so that a slow GPU run has its reason
        _log(note)
    return predictor


# --------------------------------------------------------------------------------------------
# Inputs and names


OUTPUT_IMAGE_FOLDERS = (f"images/{GC_SEGMENTATION_SLUG}", "segmentation", "overlays")  # what runs write images into


def find_inputs(input_dir: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """Every image below ``input_dir`` (sorted), and what could not be looked at (``list_images``),
    except what a run writes into the output folder ``exclude`` (its mask and overlay folders, when
    the output folder is or contains the input folder); ``InferenceError`` if there is none."""
    input_dir = Path(input_dir)
    if not input_dir.exists():
        raise InferenceError(f"input folder {input_dir} does not exist")
    if input_dir.is_dir() and unlistable_reason(input_dir):
        raise InferenceError(f"input folder {input_dir} cannot be listed: {unlistable_reason(input_dir)}")
    paths = list_images(input_dir)
    if exclude is not None:
        skip = [(Path(exclude) / sub).resolve() for sub in OUTPUT_IMAGE_FOLDERS]
        paths = [p for p in paths if not any(p.resolve().is_relative_to(s) for s in skip)]
    if not paths:
        raise InferenceError(f"no images (.mha, .tif/.tiff, .png, .jpg/.jpeg, .bmp) found below {input_dir}")
    return paths


MIN_SIDE = 16  # px; an ultrasound frame is hundreds of pixels on each side


def check_content(image: LoadedImage) -> LoadedImage:
    """``ImageReadError`` for an image that holds nothing to segment or classify: fewer than
    ``MIN_SIDE`` pixels on a side, or one value everywhere (the model would still answer, with a
    confident label; see README, Errors)."""
    h, w = image.size
    if min(h, w) < MIN_SIDE:
        raise ImageReadError(image.path, f"image is {w}x{h} px; at least {MIN_SIDE} px per side are needed")
    arr = image.array
    if arr.ndim == 3 and arr.shape[2] in (2, 4):
        arr = arr[..., :-1]  # alpha
    if arr.min() == arr.max():
        raise ImageReadError(image.path, f"every pixel has the same value ({arr.flat[0]}): nothing to segment")
    return image


def prepare_output(output_dir: str | Path, create: bool = True) -> Path:
    """Check that this user can write the output folder, and create it (``create``); before any model
    work, ``create=False`` checks without leaving a folder behind. ``InferenceError`` names the
    folder and the reason."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise InferenceError(f"output folder {out} is a file, not a folder")
    if not out.exists() and not create:  # the nearest existing folder above it must take a new folder
        above = next(p for p in out.absolute().parents if p.exists())
        reason = f"{above} is a file, not a folder" if not above.is_dir() else unwritable_reason(above)
        if reason:
            raise InferenceError(f"cannot create the output folder {out}: {reason}")
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InferenceError(f"cannot create the output folder {out}: {exc.strerror or exc}") from exc
    reason = unwritable_reason(out)
    if reason:
        raise InferenceError(f"cannot write into the output folder {out}: {reason}")
    return out


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        return Path(path.name)


def output_names(paths: Sequence[Path], root: str | Path) -> list[str]:
    """Distinct, deterministic output names for ``paths`` (see the module docstring for the rule)."""
    root = Path(root)
    rels = [_relative(Path(p), root) for p in paths]
    order = sorted(range(len(rels)), key=lambda i: rels[i].as_posix())
    taken: set[str] = set()
    names: list[str] = [""] * len(rels)
    for i in order:
        rel = rels[i]
        stem, ext = rel.stem, rel.suffix.lower().lstrip(".")
        folders = "_".join(rel.parent.parts)
        candidates = [stem, f"{folders}_{stem}", f"{stem}_{ext}", f"{folders}_{stem}_{ext}"] if folders \
            else [stem, f"{stem}_{ext}"]
        k = 2
        while True:
            free = [c for c in candidates if c.casefold() not in taken]
            if free:
                break
            candidates = [f"{stem}_{ext}_{k}"]
            k += 1
        names[i] = free[0]
        taken.add(free[0].casefold())
    return names


# --------------------------------------------------------------------------------------------
# Cases and results


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


@dataclass
class RunResult:
    cases: list[Case]
    output_dir: Path

    @property
    def succeeded(self) -> list[Case]:
        return [c for c in self.cases if c.ok]

    @property
    def failed(self) -> list[Case]:
        return [c for c in self.cases if not c.ok]

    @property
    def exit_code(self) -> int:
        if not self.cases or not self.succeeded:
            return EXIT_NOTHING_DONE
        return EXIT_SOME_FAILED if self.failed else EXIT_OK


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ImageReadError):
        return exc.reason
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else 'no message'}"


# --------------------------------------------------------------------------------------------
# Overlays (display only: nothing here feeds the network)


def to_display_rgb(array: np.ndarray) -> np.ndarray:
    """Any supported image array -> uint8 H x W x 3 for display (min-max for non-uint8 types)."""
    a = np.asarray(array)
    if a.ndim == 3:
        a = a[..., 0] if a.shape[2] in (1, 2) else a[..., :3]
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros(a.shape, np.uint8) if hi <= lo else ((a - lo) * (255.0 / (hi - lo))).round().astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.array(a, dtype=np.uint8, order="C", copy=True)  # writable, never a view of the input


def mask_contour(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Boolean H x W: lesion pixels that touch the background (4-neighbourhood), ``thickness`` wide."""
    m = mask.astype(bool)
    inner = m.copy()
    for _ in range(max(1, thickness)):
        p = np.pad(inner, 1, constant_values=False)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def render_overlay(image: np.ndarray, mask: np.ndarray | None, label: str | None,
                   probabilities: dict[str, float] | None) -> np.ndarray:
    """uint8 H x W x 3: the image, the mask's contour in red, the label and its probability."""
    from PIL import Image, ImageDraw, ImageFont

    rgb = to_display_rgb(image)
    h, w = rgb.shape[:2]
    if mask is not None:
        contour = mask_contour(mask, thickness=max(1, round(min(h, w) / 200)))
        rgb[contour] = (255, 40, 40)
    if label is None:
        return rgb
    text = label.capitalize()
    if probabilities is not None:
        text += f" {probabilities[label]:.2f}"
    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    size = max(10, min(h, w) // 14)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        font = ImageFont.load_default()
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    pad = max(2, size // 5)
    draw.rectangle((0, 0, x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), fill=(0, 0, 0))
    colour = {"normal": (120, 220, 120), "benign": (255, 220, 80), "malignant": (255, 90, 90)}.get(label, (255, 255, 255))
    draw.text((pad - x0, pad - y0), text, fill=colour, font=font)
    return np.asarray(im)


# --------------------------------------------------------------------------------------------
# Writers


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

    def write_case(self, case: Case, image: LoadedImage, pred) -> None:
        if self.overlay:
            path = self.out / "overlays" / f"{case.name}.png"
            ov = render_overlay(image.array, pred.mask if self.seg else None,
                                pred.label if self.cls else None, pred.probabilities if self.cls else None)
            write_png(path, ov)
            case.outputs.append(path)

    def finish(self, cases: list[Case]) -> None:
        errors = self.out / ERRORS_FILE
        failed = [c for c in cases if not c.ok]
        if failed:
            write_text(errors, _csv_text(("file", "reason"), [(c.rel, c.error) for c in failed]))
        elif errors.is_file():
            errors.unlink()  # from an earlier run into the same folder


class GCWriter(_Writer):
    def mask_path(self, case: Case) -> Path:
        return self.out / "images" / GC_SEGMENTATION_SLUG / f"{case.name}.mha"

    def write_case(self, case: Case, image: LoadedImage, pred) -> None:
        if self.seg:
            path = self.mask_path(case)
            write_mha(path, pred.mask.astype(np.uint8), like=image)
            case.outputs.append(path)
        super().write_case(case, image, pred)

    def entry(self, case: Case) -> dict:
        outputs = []
        if case.ok:
            pred = case.prediction
            if self.seg:
                outputs.append({"type": "mask", "filename": self.mask_path(case).relative_to(self.out).as_posix()})
            if self.cls:
                outputs.append({"type": "classification", "label": pred.label,
                                "probabilities": {k: float(pred.probabilities[k]) for k in CLASS_NAMES}})
        return {"inputs": [{"image": {"name": case.path.name}, "path": str(case.path)}],
                "outputs": outputs, "error_messages": [] if case.ok else [f"{case.rel}: {case.error}"]}

    def finish(self, cases: list[Case]) -> None:
        write_text(self.out / "results.json", _json_text([self.entry(c) for c in cases]))
        if self.cls and len(cases) == 1 and cases[0].ok:
            pred = cases[0].prediction
            probs = {k: float(pred.probabilities[k]) for k in CLASS_NAMES}
            write_text(self.out / GC_CLASSIFICATION_FILE, _json_text({"label": pred.label, "probabilities": probs}))
            write_text(self.out / GC_LIKELIHOOD_FILE, _json_text(probs["malignant"]))
        super().finish(cases)


class PACEWriter(_Writer):
    def mask_path(self, case: Case) -> Path:
        return self.out / "segmentation" / f"{case.name}_mask.png"

    def write_case(self, case: Case, image: LoadedImage, pred) -> None:
        if self.seg:
            path = self.mask_path(case)
            write_png(path, (pred.mask > 0).astype(np.uint8) * 255)
            case.outputs.append(path)
            # training.predict --logits: for training.evaluate's segmentation BCE (not kept in memory after)
            logits = getattr(pred, "extra", {}).pop("logits", None)
            path = self.out / LOGITS_DIR / f"{case.name}.npy"
            if logits is not None:
                write_npy(path, logits)
                case.outputs.append(path)
            else:  # an earlier run's logits must not be scored against this run's masks
                path.unlink(missing_ok=True)
        super().write_case(case, image, pred)

    @staticmethod
    def labels_csv(cases: list[Case]) -> str:
        return _csv_text(("image_id", "label"), [(c.name, c.prediction.label.capitalize()) for c in cases if c.ok])

    def finish(self, cases: list[Case]) -> None:
        if self.cls:
            probs = [(c.name, *(f"{float(c.prediction.probabilities[k]):.6f}" for k in CLASS_NAMES))
                     for c in cases if c.ok]
            write_text(self.out / "classification" / "predictions.csv", self.labels_csv(cases))
            write_text(self.out / "classification" / "probabilities.csv",
                       _csv_text(("image_id", *CLASS_NAMES), probs))
        super().finish(cases)


class CodabenchWriter(PACEWriter):
    """PACE's validation-phase upload: ``classification.csv`` beside ``segmentation/``, and both in
    ``submission.zip`` (entries in sorted order with a fixed date: the same predictions give the
    same bytes)."""

    def finish(self, cases: list[Case]) -> None:
        members = {}
        if self.cls:
            write_text(self.out / "classification.csv", self.labels_csv(cases))
            members["classification.csv"] = self.out / "classification.csv"
        if self.seg:
            for c in cases:
                if c.ok:
                    members[self.mask_path(c).relative_to(self.out).as_posix()] = self.mask_path(c)
        write_zip(self.out / "submission.zip", members)
        _Writer.finish(self, cases)


WRITERS = {"gc": GCWriter, "pace": PACEWriter, "codabench": CodabenchWriter}


# --------------------------------------------------------------------------------------------
# The run


def _log(message: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(message, file=sys.stderr)


def _predict(predictor, arrays: list[np.ndarray]) -> list:
    """Predictions for ``arrays``; if the batch fails, each image alone (an exception in the list
    stands for an image that fails on its own)."""
    try:
        return list(predictor.predict(arrays))
    except Exception as exc:  # noqa: BLE001 - isolate the image that breaks the batch
        from .predictor import GPUOutOfMemoryError

        if len(arrays) == 1 or isinstance(exc, GPUOutOfMemoryError):  # already retried down to single images
            raise
    out = []
    for a in arrays:
        try:
            out.append(predictor.predict([a])[0])
        except Exception as exc:  # noqa: BLE001
            out.append(exc)
    return out


def run(predictor, input_dir: str | Path, output_dir: str | Path, task: str = "all", fmt: str = "gc",
        overlay: bool = False, inputs: Sequence[Path] | None = None, progress: bool = True,
        log: Callable[[str], None] = _log) -> RunResult:
    """Predict every image below ``input_dir`` and write the outputs of ``fmt`` into ``output_dir``.

    Raises ``InferenceError`` only when there is nothing to process or ``output_dir`` cannot be
    created or written into; per-case failures are recorded in the result (``RunResult.exit_code``: 0, 3 or 1).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    input_dir, out = Path(input_dir), Path(output_dir)
    paths = list(inputs) if inputs is not None else find_inputs(input_dir, exclude=out)
    prepare_output(out)
    root = input_dir if input_dir.is_dir() else input_dir.parent
    names = output_names(paths, root)
    cases = [Case(Path(p), _relative(Path(p), root).as_posix(), n) for p, n in zip(paths, names)]
    writer = WRITERS[fmt](out, task, overlay)

    def fail(case: Case, reason: str) -> None:
        case.error, case.prediction = reason, None
        for path in case.outputs:  # a failed case leaves no partial outputs behind
            path.unlink(missing_ok=True)
        case.outputs.clear()
        log(f"error: {case.rel}: {reason}")

    from tqdm import tqdm

    batch_size = max(1, int(getattr(predictor, "batch_size", 1)))
    batches = [cases[s:s + batch_size] for s in range(0, len(cases), batch_size)]
    # with io threads (CUDA), the next batch is decoded while this one is on the GPU, and a batch's
    # files are written in the background while the next one is predicted
    # (one pool: the next batch's reads are queued before this batch's writes, so they never wait on them)
    threads = int(getattr(predictor, "io_threads", 0) or 0)
    pool = None
    if threads > 0:
        from .io_threads import io_pool  # imports torch, which this module leaves to the predictor

        pool = io_pool(threads, "pfsam-read-write")
    writing: list = []  # (case, future) of the batch being written

    def submit(batch: list[Case]):
        return [pool.submit(read_image, c.path) for c in batch] if pool is not None else None

    def write(case: Case, img: LoadedImage, pred) -> None:
        if pool is not None:
            writing.append((case, pool.submit(writer.write_case, case, img, pred)))
            return
        try:
            writer.write_case(case, img, pred)
        except Exception as exc:  # noqa: BLE001
            fail(case, f"writing the outputs failed: {_reason(exc)}")

    def settle() -> None:  # wait for the background writes; their errors are recorded here, in order
        for case, fut in writing:
            try:
                fut.result()
            except Exception as exc:  # noqa: BLE001
                fail(case, f"writing the outputs failed: {_reason(exc)}")
        writing.clear()

    try:
        pending = submit(batches[0]) if batches else None
        with tqdm(total=len(cases), desc="PF-SAM BUS", unit="image", file=sys.stderr, disable=not progress,
                  dynamic_ncols=True) as bar:
            for k, batch in enumerate(batches):
                futures, pending = pending, (submit(batches[k + 1]) if k + 1 < len(batches) else None)
                loaded: list[tuple[Case, LoadedImage]] = []
                for j, case in enumerate(batch):
                    try:
                        img = futures[j].result() if futures is not None else read_image(case.path)
                        check_content(img)
                        loaded.append((case, img))
                    except Exception as exc:  # noqa: BLE001
                        fail(case, _reason(exc))
                if loaded:
                    try:
                        preds = _predict(predictor, [img.array for _, img in loaded])
                    except Exception as exc:  # noqa: BLE001
                        preds = [exc] * len(loaded)
                    settle()  # the previous batch's files
                    for (case, img), pred in zip(loaded, preds):
                        if isinstance(pred, BaseException):
                            fail(case, f"prediction failed: {_reason(pred)}")
                            continue
                        case.prediction = pred
                        write(case, img, pred)
                bar.update(len(batch))
                del loaded, futures
            settle()
    finally:
        if pool is not None:  # after settle(), only on an error: reads not started are dropped
            pool.shutdown(cancel_futures=True)
    try:
        writer.finish(cases)
    except Exception as exc:  # noqa: BLE001 - without the summary files no case counts as done
        log(f"error: writing the summary files into {out} failed: {_reason(exc)}")
        for case in cases:
            if case.ok:
                case.error = f"summary files not written: {_reason(exc)}"
    stale = stale_outputs(out, cases)
    if stale:  # an earlier run's files: graders read every file in these folders
        shown = ", ".join(p.relative_to(out).as_posix() for p in stale[:3]) + (", ..." if len(stale) > 3 else "")
        log(f"warning: {len(stale)} file{'s' if len(stale) != 1 else ''} in {out} {'were' if len(stale) != 1 else 'was'} "
            f"not written by this run (an earlier run's?): {shown}")
    return RunResult(cases, out)


def stale_outputs(out: Path, cases: Sequence[Case]) -> list[Path]:
    """Files in the output's mask and overlay folders that this run did not write."""
    written = {p.resolve() for case in cases for p in case.outputs}
    found = []
    for sub in OUTPUT_IMAGE_FOLDERS:
        if (out / sub).is_dir():
            found += [p for p in (out / sub).rglob("*") if p.is_file() and p.resolve() not in written]
    return sorted(found)


def predict_file(predictor, image_path: str | Path, output_dir: str | Path, overlay: bool = True) -> Case:
    """One image -> its mask (``.mha`` with the input's geometry for ``.mha`` inputs, else a
    0/255 ``.png``) and optionally an overlay, in ``output_dir``; raises on any failure (Cog)."""
    path, out = Path(image_path), Path(output_dir)
    image = check_content(read_image(path))
    pred = predictor.predict([image.array])[0]
    case = Case(path, path.name, path.stem or "image", prediction=pred)
    if path.suffix.lower() == ".mha":
        mask_path = out / f"{case.name}_mask.mha"
        write_mha(mask_path, pred.mask.astype(np.uint8), like=image)
    else:
        mask_path = out / f"{case.name}_mask.png"
        write_png(mask_path, (pred.mask > 0).astype(np.uint8) * 255)
    case.outputs.append(mask_path)
    if overlay:
        ov_path = out / f"{case.name}_overlay.png"
        write_png(ov_path, render_overlay(image.array, pred.mask, pred.label, pred.probabilities))
        case.outputs.append(ov_path)
    return case


def summary_line(result: RunResult) -> str:
    n, ok = len(result.cases), len(result.succeeded)
    text = f"{ok} of {n} image{'s' if n != 1 else ''} processed"
    if result.failed:
        text += f", {len(result.failed)} failed (see {result.output_dir / ERRORS_FILE})"
    return f"{text}; outputs in {result.output_dir}"


__all__ = ["TASKS", "FORMATS", "InferenceError", "Case", "RunResult", "default_model_dir", "load_predictor",
           "find_inputs", "prepare_output", "output_names", "run", "predict_file", "render_overlay", "summary_line",
           "EXIT_OK", "EXIT_NOTHING_DONE", "EXIT_SOME_FAILED"]
