"""Batch inference over a folder, shared by ``process.py`` (Grand Challenge / PACE) and ``predict.py`` (Cog).

One run: find the images below the input folder (``model.io.list_images``), read them a batch at a
time, predict with the ensemble (``model.predictor.Predictor``), write each case's outputs as soon
as it is predicted, then the run's summary files. A case that cannot be read, predicted or written
is reported (stderr, ``errors.csv``, and ``error_messages`` in ``results.json``) and every other
case is still written. All files are written atomically (``model.atomic_files``).

The files each format writes, and how outputs are named: ``model/writers.py``. Overlays:
``model/overlay.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .atomic_files import all_or_none, remove_leftovers, replacements_kept, run_lock, write_png
from .image import IMAGE_SUFFIXES, ImageReadError, LoadedImage, image_stem, image_suffix, is_utf8_name, printable
from .io import (image_pixels, list_images, lookup_denied, masks_beside_images, read_image, unlistable_reason,
                 unwritable_reason)
from .itk_image import write_itk
from .overlay import render_overlay
from .writers import (ERRORS_FILE, OUTPUT_IMAGE_FOLDERS, WRITERS, Case, output_folders, output_names, relative_path,
                      stale_outputs)

TASKS = ("all", "seg", "cls")
FORMATS = ("gc", "pace", "codabench")
SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")  # where Grand Challenge mounts an uploaded model

EXIT_OK = 0
EXIT_NOTHING_DONE = 1
EXIT_SOME_FAILED = 3


class InferenceError(RuntimeError):
    """Nothing can be processed (no inputs, no model, no device); the message says why."""


@contextlib.contextmanager
def _looking_at(what: str):
    """A ``PermissionError`` while looking at a folder (a folder on its way this user may not enter, or
    one it may not list) becomes an ``InferenceError``: ``what``, the folder in the way and its mode."""
    try:
        yield
    except PermissionError as exc:
        raise InferenceError(f"{what}: {lookup_denied(exc.filename or '.')}") from None


# --------------------------------------------------------------------------------------------
# Model


def default_model_dir() -> Path:
    """The model to run when none is named: the upload at ``/opt/ml/model`` (Grand Challenge), else
    the ensemble shipped with the package (``model/weights/default``).

    An upload's ``ensemble.json`` (or, for a single model, its ``config.json``) may be at the top of
    ``/opt/ml/model`` or one folder down (a tarball packed with its folder). An upload that holds
    files but no model is an error, never a silent fall-back to the built-in model."""
    root = SAGEMAKER_MODEL_DIR
    with _looking_at(f"cannot read the uploaded model in {root}"):
        if (root / "ensemble.json").is_file() or (root / "config.json").is_file():
            return root
        entries = sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []
        found = (sorted(p.parent for p in root.glob("*/ensemble.json"))
                 or sorted(p.parent for p in root.glob("*/config.json"))) if entries else []
    if entries:
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
                   runtime: str = "auto", class_prior: str | None = None):
    """Load the ensemble once; any failure becomes an ``InferenceError`` naming the folder."""
    from .predictor import Predictor

    if model_dir is None:
        model_dir = default_model_dir()
        _log(f"model: {model_dir}" + (" (uploaded)" if model_dir.is_relative_to(SAGEMAKER_MODEL_DIR) else " (built in)"),
             err=False)
    model_dir = Path(model_dir)
    device = {"gpu": "cuda"}.get(device, device)
    from .predictor import resolve_device

    try:
        resolve_device(device)  # a device that is not there is not a model failure
    except RuntimeError as exc:
        raise InferenceError(str(exc)) from None
    with _looking_at(f"cannot load the model from {model_dir}"):
        if not model_dir.is_dir():  # only a named folder can be missing: the defaults are checked above
            raise InferenceError(f"cannot load the model: {model_dir} "
                                 f"{'is a file, not a model folder' if model_dir.exists() else 'does not exist'}")
    try:
        predictor = Predictor.from_dir(model_dir, device=device, batch_size=batch_size, tta=tta,
                                       precision=precision, compile_backend=compile_backend, runtime=runtime,
                                       class_prior=class_prior, keep_freed=True)  # a tool's own process
    except Exception as exc:  # noqa: BLE001 - every reason is reported the same way
        raise InferenceError(f"cannot load the model from {model_dir}: {exc}") from exc
    from .encoders.sam_vit import fused_attention_note

    notes = {fused_attention_note(m.encoder, predictor.device) for m in predictor.members.values()} - {None}
    for note in sorted(notes):  # slower, not wrong: said once, so that a slow GPU run has its reason
        _log(note)
    return predictor


# --------------------------------------------------------------------------------------------
# Inputs and the output folder


def find_inputs(input_dir: str | Path, exclude: str | Path | None = None,
                log: Callable[[str], None] | None = None) -> list[Path]:
    """Every image below ``input_dir`` (sorted), and what could not be looked at (``list_images``),
    except what a run writes into the output folder ``exclude`` (its mask and overlay folders, when
    the output folder is or contains the input folder) and the masks of a dataset kept beside their
    images (``masks_beside_images``: BUSI's ``X_mask.png`` beside ``X.png``; one note on ``log``,
    stderr by default, says how many); ``InferenceError`` if there is none."""
    input_dir = Path(input_dir)
    with _looking_at(f"input folder {input_dir} cannot be read"):
        if not input_dir.exists():
            raise InferenceError(f"input folder {input_dir} does not exist")
        if input_dir.is_dir() and unlistable_reason(input_dir):
            raise InferenceError(f"input folder {input_dir} cannot be listed: {unlistable_reason(input_dir)}")
        paths = list_images(input_dir)
    if exclude is not None:
        # realpath, not Path.resolve: it raises on a link loop, which read_image reports by name
        skip = [Path(os.path.realpath(Path(exclude) / sub)) for sub in OUTPUT_IMAGE_FOLDERS]
        paths = [p for p in paths if not any(Path(os.path.realpath(p)).is_relative_to(s) for s in skip)]
    if input_dir.is_dir():  # a file given by name is predicted whatever its name
        masks = set(masks_beside_images(paths))
        if masks:
            (log or _log)(f"note: {len(masks)} file(s) named as the mask of an image beside them (such as "
                          f"{printable(relative_path(min(masks), input_dir).as_posix())}) are ground truth, "
                          f"not inputs: skipped (give one with -i to predict it)")
            paths = [p for p in paths if p not in masks]
    if not paths:
        raise InferenceError(f"no images (.mha/.mhd, .nii/.nii.gz, .nrrd/.nhdr, .tif/.tiff, .png, .jpg/.jpeg, .bmp, DICOM) found "
                             f"below {input_dir}")
    return paths


MIN_SIDE = 16  # px; an ultrasound frame is hundreds of pixels on each side
# long side / short side: the image is resized to the encoder's square input by its long side, so a
# 16 x 4098 strip became one row of LiteMedSAM's 256 (a quarter of one of its 64 token rows) and
# still got "benign 0.95"; at 16:1 the short side covers 4 token rows, at 256 px as at 1024
MAX_ASPECT = 16


def _two_valued(arr: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> bool:
    return bool(((arr == lo) | (arr == hi)).all())


def check_content(image: LoadedImage) -> LoadedImage:
    """``ImageReadError`` for an image that holds nothing to segment or classify: fewer than
    ``MIN_SIDE`` pixels on a side, a long side over ``MAX_ASPECT`` times the short one, one value
    everywhere, or two values only (a mask: each channel at its lowest or its highest value) (the
    model would still answer, with a confident label; see README, Errors)."""
    h, w = image.size
    if min(h, w) < MIN_SIDE:
        raise ImageReadError(image.path, f"image is {w}x{h} px; at least {MIN_SIDE} px per side are needed")
    if max(h, w) > MAX_ASPECT * min(h, w):
        raise ImageReadError(image.path, f"image is {w}x{h} px; its long side may be at most {MAX_ASPECT} times its "
                                         f"short side (resized to the model's square input, the short side would "
                                         f"cover under 1/{MAX_ASPECT} of it: too little to see a lesion in)")
    arr = image.array
    if arr.ndim == 3 and arr.shape[2] in (2, 4):
        arr = arr[..., :-1]  # alpha
    lo, hi = arr.min(axis=(0, 1)), arr.max(axis=(0, 1))  # per channel: one colour everywhere, not only one grey
    if np.array_equal(lo, hi):
        value = lo.flat[0] if (lo == lo.flat[0]).all() else tuple(lo.tolist())
        shown = value if isinstance(value, tuple) else f"({value})"
        raise ImageReadError(image.path, f"every pixel has the same value {shown}: nothing to segment")
    # each channel at its lowest or highest value only; a sparse sample first settles it for any real
    # image without a full-size pass (3 boolean copies of a 10000 x 10000 RGB image: 900 MB)
    if _two_valued(arr[::7, ::7], lo, hi) and _two_valued(arr, lo, hi):
        shown = " and ".join(str(tuple(v.tolist()) if v.size > 1 else v.flat[0]) for v in (lo, hi))
        raise ImageReadError(image.path, f"the image holds two values only ({shown}): a mask or a drawing, "
                                         f"not an ultrasound image")
    return image


def prepare_output(output_dir: str | Path, create: bool = True, folders: list[str] | tuple = ()) -> Path:
    """Check that this user can write the output folder, and create it (``create``); before any model
    work, ``create=False`` checks without leaving a folder behind. ``folders`` (``output_folders``:
    what the run writes into) that an earlier run left there, perhaps as another user, are checked
    too. ``InferenceError`` names the folder and the reason."""
    out = Path(output_dir)
    if not is_utf8_name(out.absolute()):  # the outputs name it (results.json), and ITK cannot write there
        raise InferenceError(f"output folder {printable(out)}: its path is not valid UTF-8; choose another")
    with _looking_at(f"cannot use the output folder {out}"):
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
        # a run writes, replaces and removes files in these folders: through a link, outside the output
        # folder (an input folder given as -o could bring such links along)
        for sub in ("classification", "images", *OUTPUT_IMAGE_FOLDERS):
            if (out / sub).is_symlink():
                raise InferenceError(f"{out / sub} is a link (to {os.readlink(out / sub)}): a run writes only "
                                     f"below its output folder; remove the link, or give its target as -o")
        for sub in folders:  # the deepest part that exists: the run creates the rest in it
            folder = out / sub
            while not folder.exists() and folder != out:
                folder = folder.parent
            if folder == out:
                continue
            if not folder.is_dir():
                raise InferenceError(f"cannot write into {folder}: an earlier run left a file there, not a folder")
            if reason := unwritable_reason(folder):
                raise InferenceError(f"cannot write into {folder}, a folder an earlier run left in the output folder: "
                                     f"{reason}")
    return out


# --------------------------------------------------------------------------------------------
# Results


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
# The run


def _log(message: str, err: bool = True) -> None:
    """A line of the run's log: on stderr (notes, warnings, errors), or ``err=False`` on stdout (what a
    clean run says: Grand Challenge marks a job that wrote to stderr with a warning)."""
    stream = sys.stderr if err else sys.stdout
    try:
        from tqdm import tqdm

        tqdm.write(message, file=stream)
    except ImportError:  # pragma: no cover
        print(message, file=stream)
    except (OSError, ValueError):  # a full disk, a closed pipe or stream: the run goes on; errors.csv holds its errors
        pass


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


PIXELS_PER_BATCH = 64_000_000  # a batch's inputs together; a larger image is a batch of its own


def plan_batches(cases: Sequence[Case], batch_size: int) -> list[list[Case]]:
    """Consecutive batches of at most ``batch_size`` cases and ``PIXELS_PER_BATCH`` input pixels
    (from the files' headers). A batch's images are all in memory at once, full size, until its
    outputs are written: without the pixel bound, four 10000 x 10000 RGB images take the process
    past a 4 GB container's memory, where typical ultrasound frames (under a megapixel) still
    batch fully."""
    batches: list[list[Case]] = []
    current, pixels = [], 0
    for case in cases:
        n = image_pixels(case.path)
        if current and (len(current) == batch_size or pixels + n > PIXELS_PER_BATCH):
            batches.append(current)
            current, pixels = [], 0
        current.append(case)
        pixels += n
    if current:
        batches.append(current)
    return batches


def run(predictor, input_dir: str | Path, output_dir: str | Path, task: str = "all", fmt: str = "gc",
        overlay: bool = False, inputs: Sequence[Path] | None = None, progress: bool = True,
        log: Callable[[str], None] = _log, logits: bool = False) -> RunResult:
    """Predict every image below ``input_dir`` and write the outputs of ``fmt`` into ``output_dir``
    (with ``logits``, also each mask's lesion logits: ``model.writers``).

    Raises ``InferenceError`` only when there is nothing to process or ``output_dir`` cannot be
    created or written into; per-case failures are recorded in the result (``RunResult.exit_code``: 0, 3 or 1).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    input_dir, out = Path(input_dir), Path(output_dir)
    paths = list(inputs) if inputs is not None else find_inputs(input_dir, exclude=out)
    prepare_output(out, folders=output_folders(fmt, task, overlay, logits))
    with run_lock(out):  # this run's hidden files are known as a live run's, also from another container
        return _run(predictor, input_dir, out, paths, task, fmt, overlay, progress, log, logits)


def _run(predictor, input_dir: Path, out: Path, paths: list[Path], task: str, fmt: str, overlay: bool,
         progress: bool, log: Callable[[str], None], logits: bool) -> RunResult:
    # a killed run's temporary files (their final names stay whole), in any folder a run writes into:
    # graders read every file there
    left = remove_leftovers(out, ("", "classification", *OUTPUT_IMAGE_FOLDERS))
    if left:
        log(f"note: removed {len(left)} unfinished file{'s' if len(left) != 1 else ''} of a run that was killed "
            f"({left[0].relative_to(out).as_posix()}{', ...' if len(left) > 1 else ''})")
    root = input_dir if input_dir.is_dir() else input_dir.parent
    names = output_names(paths, root)
    cases = [Case(Path(p), printable(relative_path(Path(p), root).as_posix()), n) for p, n in zip(paths, names)]
    writer = WRITERS[fmt](out, task, overlay)

    def fail(case: Case, reason: str) -> None:
        case.fail(reason)
        log(f"error: {case.rel}: {reason}")

    from tqdm import tqdm

    batches = plan_batches(cases, max(1, int(getattr(predictor, "batch_size", 1))))
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

    def written(case: Case) -> None:  # the summary files need the label and probabilities, not the mask
        if case.prediction is not None and getattr(case.prediction, "mask", None) is not None:
            case.prediction = dataclasses.replace(case.prediction, mask=None)

    def write(case: Case, img: LoadedImage, pred) -> None:
        if pool is not None:
            writing.append((case, pool.submit(writer.write_case, case, img, pred)))
            return
        try:
            writer.write_case(case, img, pred)
            written(case)
        except Exception as exc:  # noqa: BLE001
            fail(case, f"writing the outputs failed: {_reason(exc)}")

    def settle() -> None:  # wait for the background writes; their errors are recorded here, in order
        for case, fut in writing:
            try:
                fut.result()
                written(case)
            except Exception as exc:  # noqa: BLE001
                fail(case, f"writing the outputs failed: {_reason(exc)}")
        writing.clear()

    def stopped() -> None:  # a note where this run wrote outputs beside an earlier run's summary
        wrote = [c for c in cases if c.outputs]
        earlier = [p for p in [*writer.summary_files(), out / ERRORS_FILE] if p.is_file()]
        if wrote and earlier:  # kept (a -t cls run's answers beside this -t seg run's masks), but said
            log(f"note: {', '.join(p.name for p in earlier)} in {out} {'are' if len(earlier) > 1 else 'is'} an "
                f"earlier run's: this run, stopped, wrote some of its outputs but not its own summary")

    # what this run's files replace is kept until the run ends: a case that fails puts it back
    with replacements_kept():
        kept_logits = getattr(predictor, "keep_logits", False)  # the predictor's own setting comes back after the run
        predictor.keep_logits = logits and task != "cls"
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
                    # nothing of this batch is held while the next one is read (full-size images and masks)
                    loaded = futures = preds = img = pred = None
                settle()
        except BaseException:  # stopped (SIGTERM, Ctrl-C): this run's summary is not written
            stopped()
            raise
        finally:
            predictor.keep_logits = kept_logits
            if pool is not None:  # after settle(), only on an error: reads not started are dropped
                pool.shutdown(cancel_futures=True)
        try:
            with all_or_none():  # the summary files all in place, or none: an earlier run's stay as they were
                writer.finish(cases)
        except Exception as exc:  # noqa: BLE001 - without the summary files no case counts as done
            log(f"error: writing the summary files into {out} failed: {_reason(exc)}")
            writer.carried = 0
            for case in cases:
                if case.ok:  # failed like any other: its masks and overlays go, and what they replaced comes back
                    case.fail(f"summary files not written: {_reason(exc)}")
            try:  # errors.csv is written last: an earlier run's must not stand for this one's
                writer.write_errors(cases)
            except Exception:  # noqa: BLE001 - then no errors.csv at all; the reasons are in the log
                with contextlib.suppress(OSError):
                    (out / ERRORS_FILE).unlink(missing_ok=True)
        except BaseException:  # stopped while the summary was written: none of it is in place
            stopped()
            raise
    if writer.carried:  # the other task's outputs of its own inputs, from an earlier one-task run
        other = "segmentation" if task == "cls" else "classification"
        log(f"note: the summary ({', '.join(p.name for p in writer.summary_files())}) also holds the {other} of "
            f"{writer.carried} of these inputs from an earlier run in {out}, as one run of both tasks writes it")
    stale = stale_outputs(out, cases, task, writer)
    if stale:  # an earlier run's files: graders read every file in these folders
        shown = ", ".join(p.relative_to(out).as_posix() for p in stale[:3]) + (", ..." if len(stale) > 3 else "")
        log(f"warning: {len(stale)} file{'s' if len(stale) != 1 else ''} in {out} {'were' if len(stale) != 1 else 'was'} "
            f"not written by this run (an earlier run's?): {shown}")
    return RunResult(cases, out)


def predict_file(predictor, image_path: str | Path, output_dir: str | Path, overlay: bool = True) -> Case:
    """One image -> its mask (MetaImage, NIfTI and NRRD inputs: in their own format, in one file,
    ``.mha``, ``.nii``, ``.nii.gz`` or ``.nrrd``, with the input's geometry, known by their content where
    the name has no image suffix: ``io.is_metaimage``, ``nifti.is_nifti``, ``nrrd.is_nrrd``; else a 0/255
    ``.png``) and optionally an overlay, in ``output_dir``; raises on any failure (Cog)."""
    path, out = Path(image_path), Path(output_dir)
    if image_suffix(path) in (".mhd", ".nhdr"):  # a URL's name keeps its suffix: a sibling in the server's
        # temporary folder would be read as its pixel data
        raise ImageReadError(path, "a detached header (.mhd, .nhdr), whose pixel data is in another file, which an "
                                   "upload cannot bring along: send a .mha or .nrrd that holds its pixels")
    image = check_content(read_image(path))
    pred = predictor.predict([image.array])[0]
    stem = image_stem(path) if image_suffix(path) in IMAGE_SUFFIXES else path.stem
    case = Case(path, path.name, stem or "image", prediction=pred)
    if image.itk_suffix:  # by content too: a Cog upload of a .mha arrives as file.bin
        mask_path = out / f"{case.name}_mask{image.itk_suffix}"
        write_itk(mask_path, pred.mask.astype(np.uint8), like=image)
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
    """E.g. ``3 of 4 images processed, 1 failed, 1 folder not listed (see errors.csv); outputs in out``.
    A folder that could not be listed is in errors.csv but is not counted as an image."""
    # isdir is False, not an error, where it cannot look; an input that became a folder is an image
    folders = [c for c in result.failed if (c.error or "").startswith("folder cannot be") and os.path.isdir(c.path)]
    images = [c for c in result.cases if c not in folders]
    n, ok, bad = len(images), len(result.succeeded), len(images) - len(result.succeeded)
    text = f"{ok} of {n} image{'s' if n != 1 else ''} processed"
    if bad:
        text += f", {bad} failed"
    if folders:
        text += f", {len(folders)} folder{'s' if len(folders) != 1 else ''} not listed"
    if result.failed:  # errors.csv is among the summary files, which may be what failed
        errors = result.output_dir / ERRORS_FILE
        text += f" (see {errors})" if errors.is_file() else " (the reasons are above; errors.csv could not be written)"
    return f"{text}; outputs in {result.output_dir}"


__all__ = ["TASKS", "FORMATS", "InferenceError", "RunResult", "default_model_dir", "load_predictor", "find_inputs",
           "check_content", "prepare_output", "run", "predict_file", "summary_line", "EXIT_OK", "EXIT_NOTHING_DONE",
           "EXIT_SOME_FAILED"]
