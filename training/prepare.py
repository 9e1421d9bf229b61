"""Prepare the breast-ultrasound datasets as one training folder.

    python -m training.prepare [--busi DIR] [--busbra DIR] [--breast DIR] [--pace DIR] --out DATA \
        [--seed 0] [--val-fraction 0.2]

Output (a contract other modules rely on):
    DATA/images/<image_id>.png   original pixels (grey stays grey, RGB stays RGB, alpha dropped)
    DATA/masks/<image_id>.png    uint8 {0,255}, same H x W as the image, all zero for normal
    DATA/labels.csv              image_id,label,source,original_path,patient_id
    DATA/split.csv               image_id,split (train|val)
    DATA/report.json             counts, duplicates, per-case errors

Image ids follow the PACE naming ``PACE_{n:05d}_{000|001|002}_{BUS|BRE|BBR|ABR}``; n counts up
from 1 over the whole listing sorted by (source, original path), skipping numbers a PACE input
folder already uses (PACE inputs keep their own ids). A case that cannot be used (bad mask, no
mask for a lesion, no label) is reported and skipped; pixel-identical images are kept once, and
not at all when their labels disagree. Patients are identified by (source, patient_id).
An --out that is, lies inside or holds a source folder is refused, and so are sources in which
nothing can be prepared; over an earlier run only the files of ids its labels.csv listed are removed.

Near-duplicates (on by default; ``--no-near-duplicates`` gives the split of before session 27, on
which the embedded default model was trained): the same scan exported twice, re-cropped or
re-encoded, is not pixel-identical, and BUSI holds about a hundred such pairs. Images whose 32 x 32
grey thumbnails correlate above ``NEAR_DUPLICATE_CORRELATION``, or whose aspect-kept crop search
matches above ``CROP_CORRELATION`` (re-crops, ``crop_duplicate_pairs``), are one group: the split keeps a group
on one side, as it keeps a patient's images, and a group whose labels disagree (the same scan
called benign and malignant) is dropped, as pixel-identical conflicts are.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import shutil
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import click
import numpy as np
from PIL import Image
from tqdm import tqdm

from model.atomic_files import atomic_path, write_png, write_text
from model.io import ImageReadError, read_image, read_mask
from training.grouping import linked
from training.sources import LABEL_CODE, PACE_NAME, READERS, Record

LABEL_FIELDS = ["image_id", "label", "source", "original_path", "patient_id"]
WARNING_READERS = ("busi", "pace")  # the readers that report the files they leave out


def list_records(sources: dict[str, Path], limit: int | None = None, warn=None) -> list[Record]:
    """Every record of the given sources, sorted by (source, path), with its image id set;
    ``warn(path, reason)`` hears of the files a reader leaves out."""
    records = []
    for name, root in sources.items():
        found = sorted(READERS[name](root, warn) if warn and name in WARNING_READERS else READERS[name](root),
                       key=lambda r: str(r.image))
        records += found[:limit] if limit else found
    records.sort(key=lambda r: (r.source, str(r.image)))
    taken = {int(PACE_NAME.match(r.image_id)[1]) for r in records if r.image_id}
    owner: dict[str, Record] = {}
    n = 0
    for r in records:
        if not r.image_id:
            n += 1
            while n in taken:
                n += 1
            if r.label in LABEL_CODE:
                r.image_id = f"PACE_{n:05d}_{LABEL_CODE[r.label]}_{r.source}"
        elif r.image_id in owner and not r.problem:
            r.problem = f"image id {r.image_id} already used by {owner[r.image_id].image}"
        owner.setdefault(r.image_id, r)
    return records


def _plain_png(data: bytes) -> bool:
    """An 8-bit grey or RGB PNG: its bytes can be copied unchanged (IHDR bit depth / colour type)."""
    return data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[24] == 8 and data[25] in (0, 2)


def fingerprint(record: Record) -> tuple[np.ndarray, str, str, bool]:
    """(pixels, pixel hash, byte hash, plain 8-bit grey/RGB PNG) of a record's image; ImageReadError
    with the reason where it cannot be read (a broken link, its permissions, ...)."""
    image = read_image(record.image).array
    try:
        data = record.image.read_bytes()
    except OSError as exc:  # gone or changed since it was read
        raise ImageReadError(record.image, exc.strerror or str(exc)) from None
    pixel_hash = hashlib.sha256(f"{image.shape}{image.dtype}".encode() + image.tobytes()).hexdigest()
    plain = record.image.suffix.lower() == ".png" and _plain_png(data)
    return image, pixel_hash, hashlib.sha256(data).hexdigest(), plain


NEAR_DUPLICATE_CORRELATION = 0.95
THUMBNAIL_SIDE = 32
_GREY = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as Pillow's "L"


def thumbnail(image: np.ndarray) -> np.ndarray | None:
    """The image as a 32 x 32 grey thumbnail, centred and scaled to unit norm (so that the dot product
    of two is their correlation); None for an image of one value."""
    a = _grey(image)
    t = np.asarray(Image.fromarray(a, "F").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BILINEAR), np.float64)
    t = t.ravel() - t.mean()
    norm = float(np.linalg.norm(t))
    return t / norm if norm > 1e-9 else None


def near_duplicate_pairs(thumbs: dict[str, np.ndarray], threshold: float = NEAR_DUPLICATE_CORRELATION,
                         block: int = 1024) -> list[tuple[str, str, float]]:
    """(id, id, correlation) of every pair of thumbnails correlating above ``threshold``, ids in order;
    in blocks of rows, so that memory grows with the images, not with their square."""
    ids = sorted(thumbs)
    if len(ids) < 2:
        return []
    x = np.stack([thumbs[i] for i in ids])
    pairs = []
    for start in range(0, len(ids), block):
        c = x[start:start + block] @ x.T
        for a, b in np.argwhere(c > threshold):
            if b > start + a:
                pairs.append((ids[start + a], ids[b], round(float(c[a, b]), 4)))
    return pairs


# The same scan exported with another crop: a whole-image thumbnail squeezes each crop's own width into
# 32 columns, so the same tissue lands on other columns and the pair correlates below 0.95 (BUSI's
# benign (154) / (21): 0.944; cutting 10 % off one side of an image left half of 14 BUSI images below
# 0.95). Pairs whose thumbnails correlate above CROP_CANDIDATE are searched again with the aspect ratio
# kept: the middle of one (CROP_TEMPLATE of each side, at PROFILE_HEIGHT rows) is looked for in the
# other at CROP_SCALES, every shift, by normalised cross-correlation. On BUSI + BUS-BRA (3027 candidate
# pairs, session 47) the three re-crops found in review scored 0.954-0.989 (the highest pair 0.998), and
# no pair of different labels above 0.925 but one scan under two labels, benign (333) = malignant (77):
# 0.980, seen by eye.
CROP_CANDIDATE = 0.85
CROP_CORRELATION = 0.95
PROFILE_HEIGHT = 96
CROP_TEMPLATE = (0.2, 0.8)
CROP_SCALES = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.17, 1.25)


def _grey(image: np.ndarray) -> np.ndarray:
    a = image.astype(np.float32)
    if a.ndim == 3:
        a = a[..., 0] if a.shape[2] in (1, 2) else a[..., :3] @ _GREY
    return a


def profile(image: np.ndarray) -> np.ndarray:
    """The image in grey at ``PROFILE_HEIGHT`` rows, its aspect ratio kept, scaled to 0..255 (uint8:
    a few tens of kB per image, kept for the crop search)."""
    a = _grey(image)
    h, w = a.shape
    width = max(8, round(w * PROFILE_HEIGHT / h))
    t = np.asarray(Image.fromarray(a, "F").resize((width, PROFILE_HEIGHT), Image.BILINEAR), np.float32)
    lo, hi = float(t.min()), float(t.max())
    return np.round((t - lo) * (255.0 / (hi - lo if hi > lo else 1.0))).astype(np.uint8)


def _best_ncc(template: np.ndarray, image: np.ndarray) -> float:
    """The highest normalised cross-correlation of ``template`` over every position inside ``image``."""
    from scipy.signal import fftconvolve

    th, tw = template.shape
    if image.shape[0] < th or image.shape[1] < tw:
        return -1.0
    t = template - template.mean()
    tn = float(np.sqrt((t * t).sum()))
    if tn < 1e-9:
        return -1.0
    ones = np.ones(template.shape)
    num = fftconvolve(image, t[::-1, ::-1], "valid")
    s1 = fftconvolve(image, ones, "valid")
    s2 = fftconvolve(image * image, ones, "valid")
    var = s2 - s1 * s1 / t.size
    ok = var > 1e-6 * t.size  # a flat window has no correlation (not the ratio of two round-off errors)
    if not ok.any():
        return -1.0
    return float((num[ok] / (np.sqrt(var[ok]) * tn)).max())


def crop_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """How well the middle of either profile is found inside the other, over ``CROP_SCALES``."""
    def one_way(x: np.ndarray, y: np.ndarray) -> float:
        x = x.astype(np.float64)
        h, w = x.shape
        lo, hi = CROP_TEMPLATE
        template = x[int(h * lo):int(h * hi), int(w * lo):int(w * hi)]
        best = -1.0
        for scale in CROP_SCALES:
            rows = round(PROFILE_HEIGHT * scale)
            cols = max(8, round(y.shape[1] * rows / y.shape[0]))
            scaled = np.asarray(Image.fromarray(y.astype(np.float32), "F").resize((cols, rows), Image.BILINEAR),
                                np.float64)
            best = max(best, _best_ncc(template, scaled))
        return best
    return max(one_way(a, b), one_way(b, a))


def crop_duplicate_pairs(thumbs: dict[str, np.ndarray], profiles: dict[str, np.ndarray], linked_ids: list[list[str]],
                         candidate: float = CROP_CANDIDATE, threshold: float = CROP_CORRELATION,
                         progress: bool = True) -> list[tuple[str, str, float]]:
    """(id, id, crop correlation) of the pairs whose thumbnails correlate above ``candidate`` (and not
    above the near-duplicate threshold) that ``crop_correlation`` matches above ``threshold``; pairs
    already in one group (``linked_ids``) are not searched."""
    group = {i: k for k, ids in enumerate(linked_ids) for i in ids}
    candidates = [(a, b) for a, b, _ in near_duplicate_pairs(thumbs, candidate)
                  if group.get(a, ("a", a)) != group.get(b, ("b", b))]
    pairs = []
    for a, b in tqdm(candidates, desc="near-duplicates (crops)", unit="pair", file=sys.stderr, disable=not progress):
        c = crop_correlation(profiles[a], profiles[b])
        if c > threshold:
            pairs.append((a, b, round(c, 4)))
    return pairs


def _groups(pairs) -> list[list[str]]:
    """Connected groups of the pairs' ids (sorted)."""
    members: dict[str, list[str]] = defaultdict(list)
    for x, root in linked({x for p in pairs for x in p[:2]}, (p[:2] for p in pairs)).items():
        members[root].append(x)
    return sorted(sorted(m) for m in members.values())


def lesion_mask(record: Record, size: tuple[int, int]) -> np.ndarray:
    """Union of the record's masks as uint8 {0,255}; raises ImageReadError for an unusable mask."""
    h, w = size
    mask = np.zeros((h, w), np.uint8)
    for path in record.masks:
        m = read_mask(path)
        if m.shape != (h, w):
            raise ImageReadError(path, f"mask size {m.shape[1]}x{m.shape[0]} differs from image size {w}x{h}")
        mask |= m
    if record.label != "normal" and not mask.any():
        raise ImageReadError(record.image, "lesion image with an empty mask")
    return mask * 255


def write_case(out: Path, image_id: str, source: Path, image: np.ndarray, plain: bool, mask: np.ndarray) -> None:
    if plain:  # 8-bit grey/RGB PNG: the bytes already hold exactly these pixels
        with atomic_path(out / "images" / f"{image_id}.png") as tmp:
            shutil.copyfile(source, tmp)
    else:
        if image.ndim == 3 and image.shape[2] in (2, 4):  # drop alpha
            image = image[..., 0] if image.shape[2] == 2 else image[..., :3]
        write_png(out / "images" / f"{image_id}.png", image)
    write_png(out / "masks" / f"{image_id}.png", mask)


def assign_split(rows: list[dict], val_fraction: float, seed: int,
                 together: list[list[str]] | None = None) -> dict[str, str]:
    """image_id -> train|val: whole patient groups, aiming at val_fraction of each (source, label).
    ``together``: lists of image ids that must share a side too (near-duplicates); with them a
    patient's group and a near-duplicate group that share an image become one."""
    def own_key(row: dict) -> tuple:
        return (row["source"], row["patient_id"]) if row["patient_id"] else ("", row["image_id"])

    key_of = {row["image_id"]: own_key(row) for row in rows}
    root = linked(key_of.values(), ([key_of[i] for i in ids if i in key_of] for ids in together or []))
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[root[own_key(row)]].append(row)
    totals = Counter((r["source"], r["label"]) for r in rows)
    target = {k: round(val_fraction * n) for k, n in totals.items()}
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    in_val: Counter = Counter()
    split = {}
    for key in keys:
        g = Counter((r["source"], r["label"]) for r in groups[key])
        before = sum(abs(target[c] - in_val[c]) for c in g)
        after = sum(abs(target[c] - in_val[c] - g[c]) for c in g)
        to_val = after < before
        if to_val:
            in_val.update(g)
        for r in groups[key]:
            split[r["image_id"]] = "val" if to_val else "train"
    return split


def _csv_text(fields: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


class PrepareError(RuntimeError):
    """A preparation refused before anything in --out is deleted; the message names the folders."""


def check_out_folder(sources: dict[str, Path], out: Path) -> None:
    """PrepareError when ``out`` is a source folder, lies inside one or holds one: preparing replaces
    files in ``out`` and removes the ones it wrote before, which must never touch the sources."""
    o = Path(out).resolve()
    for name, root in sources.items():
        s = Path(root).resolve()
        if o == s or s in o.parents or o in s.parents:
            where = "is" if o == s else "is inside" if s in o.parents else "contains"
            raise PrepareError(f"--out {out} {where} the --{name} source folder {root}: prepare writes and removes "
                               "files in --out; give a folder outside the sources")


def _previous_ids(out: Path) -> set[str]:
    """The image ids the labels.csv of an earlier run in ``out`` lists (the files prepare wrote there)."""
    try:
        with open(out / "labels.csv", newline="", encoding="utf-8-sig") as fh:
            return {(row.get("image_id") or "").strip() for row in csv.DictReader(fh)} - {""}
    except (OSError, UnicodeDecodeError, csv.Error):
        return set()


def prepare(sources: dict[str, Path], out: Path, seed: int = 0, val_fraction: float = 0.2,
            limit: int | None = None, near_duplicates: bool = True) -> dict:
    start = time.monotonic()
    out = Path(out)
    check_out_folder(sources, out)
    errors, warnings = [], []

    def unused(path: Path, reason: str) -> None:
        warnings.append({"path": str(path), "image_id": "", "reason": reason})
        tqdm.write(f"warning: {path}: {reason}", file=sys.stderr)

    records = list_records(sources, limit, unused)
    if not records:
        raise PrepareError("no images found in " + ", ".join(f"--{k} {v}" for k, v in sources.items())
                           + f"; nothing prepared and nothing in {out} changed (is it the right folder and option?)")
    previous = _previous_ids(out)

    def fail(record: Record, reason: str, path: Path | str | None = None) -> None:
        errors.append({"path": str(path or record.image), "image_id": record.image_id, "reason": reason})
        tqdm.write(f"error: {path or record.image}: {reason}", file=sys.stderr)

    finished = out / "split.csv"  # what marks a preparation whole (training reads no dataset without it)
    unfinished = False  # whether this run has overwritten an earlier run's files (and removed its split.csv)
    by_pixels: dict[str, list[tuple[Record, str, bool]]] = defaultdict(list)  # hash -> (record, byte hash, ok)
    thumbs: dict[str, np.ndarray] = {}  # image id -> thumbnail, for near-duplicates
    profiles: dict[str, np.ndarray] = {}  # image id -> aspect-kept grey profile, for re-cropped ones
    written: dict[str, Record] = {}  # pixel hash -> the one record written for it
    for record in tqdm(records, desc="prepare", unit="img", file=sys.stderr):
        if record.problem:
            fail(record, record.problem)
            continue
        try:
            image, pixel_hash, byte_hash, plain = fingerprint(record)
        except ImageReadError as exc:
            fail(record, exc.reason, exc.path)
            continue
        try:
            mask, ok = lesion_mask(record, image.shape[:2]), True
        except ImageReadError as exc:  # still takes part in duplicate detection (label conflicts)
            fail(record, exc.reason, exc.path)
            mask, ok = None, False
        if ok and record.label == "normal" and mask.any():
            warnings.append({"path": str(record.image), "image_id": record.image_id,
                             "reason": "normal image with a non-empty mask; mask written empty"})
            mask[:] = 0
        by_pixels[pixel_hash].append((record, byte_hash, ok))
        if ok and pixel_hash not in written:
            if near_duplicates and (t := thumbnail(image)) is not None:
                thumbs[record.image_id] = t
                profiles[record.image_id] = profile(image)
            if not unfinished and finished.is_file() and any(
                    (out / sub / f"{record.image_id}.png").exists() for sub in ("images", "masks")):
                # an earlier run's files change from here on: until this run ends no dataset is whole here,
                # and an interrupted run leaves none to train on, rather than labels that name other images
                finished.unlink()
                (out / "report.json").unlink(missing_ok=True)
                unfinished = True
            write_case(out, record.image_id, record.image, image, plain, mask)
            written[pixel_hash] = record

    duplicates, kept = [], []
    for pixel_hash, members in by_pixels.items():
        keep = written.get(pixel_hash)
        labels = {r.label for r, _, _ in members}
        if len(labels) > 1:
            keep = None
        if len(members) > 1:
            duplicates.append({
                "kind": "byte-identical" if len({b for _, b, _ in members}) == 1 else "pixel-identical",
                "conflicting_labels": len(labels) > 1,
                "kept": keep.image_id if keep else None,
                "images": [{"image_id": r.image_id, "label": r.label, "path": str(r.image)} for r, _, _ in members],
            })
            tqdm.write(f"duplicate ({'conflicting labels, none kept' if keep is None else 'kept ' + keep.image_id}): "
                       + ", ".join(f"{r.image} [{r.label}]" for r, _, _ in members), file=sys.stderr)
        if keep is not None:
            kept.append(keep)

    together: list[list[str]] = []
    near = {"enabled": near_duplicates, "correlation": NEAR_DUPLICATE_CORRELATION,
            "crop_correlation": CROP_CORRELATION, "pairs": 0, "crop_pairs": 0, "groups": 0,
            "images": 0, "dropped_conflicting": 0}
    if near_duplicates:
        by_id = {r.image_id: r for r in kept}
        kept_thumbs = {i: t for i, t in thumbs.items() if i in by_id}
        pairs = near_duplicate_pairs(kept_thumbs)
        crops = crop_duplicate_pairs(kept_thumbs, profiles, _groups(pairs))
        crop_set = {(a, b) for a, b, _ in crops}
        pairs += crops
        groups = _groups(pairs)
        dropped = set()
        for ids in groups:
            labels = {by_id[i].label for i in ids}
            conflict = len(labels) > 1
            if conflict:
                dropped.update(ids)
            else:
                together.append(ids)
            members = set(ids)
            corr = [c for a, b, c in pairs if a in members and (a, b) not in crop_set]
            crop = [c for a, b, c in pairs if a in members and (a, b) in crop_set]
            duplicates.append({
                "kind": "near-duplicate", "conflicting_labels": conflict, "kept": None if conflict else ids,
                "correlation": [min(corr), max(corr)] if corr else None,
                "crop_correlation": [min(crop), max(crop)] if crop else None,
                "images": [{"image_id": i, "label": by_id[i].label, "path": str(by_id[i].image)} for i in ids],
            })
            found = "; ".join(f"{what} {min(c):.3f}–{max(c):.3f}" for what, c in
                              (("correlation", corr), ("crop correlation", crop)) if c)
            tqdm.write(f"near-duplicates ({'conflicting labels, none kept' if conflict else 'kept together'}; "
                       f"{found}): " + ", ".join(f"{by_id[i].image} [{by_id[i].label}]" for i in ids), file=sys.stderr)
        near.update(pairs=len(pairs) - len(crops), crop_pairs=len(crops), groups=len(groups),
                    images=sum(map(len, groups)), dropped_conflicting=len(dropped))
        kept = [r for r in kept if r.image_id not in dropped]

    rows = sorted(({"image_id": r.image_id, "label": r.label, "source": r.source,
                    "original_path": str(r.image.resolve()), "patient_id": r.patient_id} for r in kept),
                  key=lambda row: row["image_id"])
    if not rows:
        for image_id in {r.image_id for r in written.values()} - previous:  # written here, all dropped since
            for sub in ("images", "masks"):
                (out / sub / f"{image_id}.png").unlink(missing_ok=True)
        changed = (f"; the earlier run's images in {out} were overwritten, so its split.csv was removed: prepare "
                   f"again" if unfinished else f"; labels.csv and split.csv in {out} left as they were")
        raise PrepareError(f"none of the {len(records)} images found could be prepared (errors above){changed}")
    split = assign_split(rows, val_fraction, seed, together)
    for row in rows:
        row["split"] = split[row["image_id"]]
    for side in ("train", "val"):
        if not any(row["split"] == side for row in rows):
            reason = (f"no {'validation' if side == 'val' else 'training'} images in split.csv "
                      f"({len(rows)} images, --val-fraction {val_fraction}); training.train refuses such a split")
            warnings.append({"path": str(out / "split.csv"), "image_id": "", "reason": reason})
            tqdm.write(f"warning: {out / 'split.csv'}: {reason}", file=sys.stderr)
    names = {f"{row['image_id']}.png" for row in rows}
    ours = {f"{i}.png" for i in previous | {r.image_id for r in written.values()}}  # written here, or listed before
    for sub in ("images", "masks"):  # files of dropped duplicates or of an earlier run
        (out / sub).mkdir(parents=True, exist_ok=True)
        for stale in sorted((out / sub).glob("*.png")):
            if stale.name in names:
                continue
            if stale.name in ours:
                stale.unlink()
            else:
                reason = "not written by training.prepare (no earlier labels.csv lists it); left in place"
                warnings.append({"path": str(stale), "image_id": "", "reason": reason})
                tqdm.write(f"warning: {stale}: {reason}", file=sys.stderr)
    write_text(out / "labels.csv", _csv_text(LABEL_FIELDS, rows))
    write_text(out / "split.csv", _csv_text(["image_id", "split"], rows))

    count = lambda key: dict(sorted(Counter(key(r) for r in rows).items()))  # noqa: E731
    report = {
        "sources": {name: str(Path(root).resolve()) for name, root in sources.items()},
        "seed": seed, "val_fraction": val_fraction, "limit": limit,
        "listed": len(records), "prepared": len(rows), "skipped_errors": len(errors),
        "counts": {
            "label": count(lambda r: r["label"]),
            "source": count(lambda r: r["source"]),
            "split": count(lambda r: r["split"]),
            "split_label": count(lambda r: f"{r['split']}/{r['label']}"),
            "source_label": count(lambda r: f"{r['source']}/{r['label']}"),
            "source_split": count(lambda r: f"{r['source']}/{r['split']}"),
        },
        "duplicates": duplicates,
        "near_duplicates": near,
        "errors": errors,
        "warnings": warnings,
        "seconds": round(time.monotonic() - start, 1),
    }
    write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


@click.command()
@click.option("--busi", type=click.Path(exists=True, file_okay=False, path_type=Path), help="BUSI folder")
@click.option("--busbra", type=click.Path(exists=True, file_okay=False, path_type=Path), help="BUS-BRA folder")
@click.option("--breast", type=click.Path(exists=True, file_okay=False, path_type=Path), help="BrEaST folder")
@click.option("--pace", type=click.Path(exists=True, file_okay=False, path_type=Path), help="PACE/PRECISE-named folder (PACE_… or the challenge release's PABC_… ids; masks <id>_mask[_N].png "
                   "or masks/<id>.png, so a folder prepared here reads back too)")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="output folder")
@click.option("--seed", default=0, show_default=True, help="seed of the train/val split")
@click.option("--val-fraction", default=0.2, show_default=True, type=click.FloatRange(0.0, 1.0))
@click.option("--near-duplicates/--no-near-duplicates", default=True, show_default=True,
              help="Keep near-duplicate images (the same scan re-exported: 32 x 32 thumbnails correlating above "
                   f"{NEAR_DUPLICATE_CORRELATION}, or re-cropped: one's middle found in the other above "
                   f"{CROP_CORRELATION}) on one side of the split, and drop those whose labels disagree; "
                   "--no-near-duplicates gives the split the embedded default model was trained on.")
@click.option("--limit", type=click.IntRange(1), hidden=True, help="debug: first N cases of each source")
def main(busi, busbra, breast, pace, out, seed, val_fraction, near_duplicates, limit):
    """Prepare BUSI / BUS-BRA / BrEaST / PACE data as images, masks, labels.csv and split.csv."""
    sources = {k: v for k, v in {"busi": busi, "busbra": busbra, "breast": breast, "pace": pace}.items() if v}
    if not sources:
        raise click.UsageError("give at least one source: --busi, --busbra, --breast or --pace")
    try:
        report = prepare(sources, out, seed, val_fraction, limit, near_duplicates)
    except (OSError, RuntimeError) as exc:  # PrepareError too; an interrupted run leaves no split.csv
        raise click.ClickException(str(exc)) from None
    c = report["counts"]
    click.echo(f"prepared {report['prepared']} of {report['listed']} images in {out} ({report['seconds']} s): "
               f"{c['label']} {c['source']} {c['split']}; "
               f"{sum(d['kind'] != 'near-duplicate' for d in report['duplicates'])} duplicate groups, "
               f"{report['near_duplicates']['groups']} near-duplicate groups "
               f"({report['near_duplicates']['dropped_conflicting']} images dropped for conflicting labels), "
               f"{len(report['errors'])} errors", err=True)


if __name__ == "__main__":
    main()
