"""The prepared dataset (``training.prepare``'s output) as records and torch datasets.

Layout: ``DATA/images/<id>.png``, ``DATA/masks/<id>.png`` ({0,255}), ``DATA/labels.csv``
(image_id,label,source,original_path,patient_id), ``DATA/split.csv`` (image_id,split).
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model import CLASS_NAMES
from model.io import ImageReadError, read_image, read_mask


@dataclass(frozen=True)
class Record:
    image_id: str
    label: str
    source: str
    split: str
    image_path: Path
    mask_path: Path

    @property
    def label_index(self) -> int:
        return CLASS_NAMES.index(self.label)


class DataError(ValueError):
    """A prepared dataset that cannot be used as it is; the message names the file and the reason."""


def parse_label(value, labels_csv: str | Path, line: int, image_id: str) -> str:
    """A labels.csv label as a class name: case and surrounding spaces are ignored (``Benign `` is
    ``benign``); anything else raises DataError naming the file, the line and the image id."""
    name = str(value if value is not None else "").strip().lower()
    if name not in CLASS_NAMES:
        raise DataError(f"{labels_csv}, line {line} ({image_id or 'no image_id'}): unknown label {value!r}; "
                        f"allowed: {', '.join(CLASS_NAMES)} (any case)")
    return name


SPLITS = ("train", "val")


def csv_rows(path: Path, required: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """(line, row) of a csv, its column names stripped and lower-case, the columns ``required``
    checked; DataError naming the file for those missing, a file not UTF-8 or not csv. A UTF-8 byte
    order mark (Excel's "CSV UTF-8", pandas' utf-8-sig) is not part of the first column's name."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [(f or "").strip().lower() for f in reader.fieldnames or []]
            missing = [c for c in required if c not in fields]
            if missing:
                raise DataError(f"{path}: no {', '.join(missing)} column (header: {','.join(fields) or 'none'}); "
                                f"expected {','.join(required)}, as training.prepare writes it")
            rows = []
            for row in reader:
                rows.append((reader.line_num, {(k or "").strip().lower(): v for k, v in row.items()}))
            return rows
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable csv file ({exc})") from None


def read_csv(path: Path, required: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """A CSV file's rows as dicts, every value stripped (a missing one as ""); errors as ``csv_rows``."""
    return [{k: (v or "").strip() for k, v in row.items()} for _, row in csv_rows(path, required)]


def read_split(split_csv: str | Path) -> dict[str, str]:
    """``image_id -> split`` of a split.csv, ids and values stripped (a hand-edited file may pad them)
    and values in any case; DataError naming the file and the line for a row without an image id,
    a split other than train or val, or an image id given twice."""
    split_csv = Path(split_csv)
    splits: dict[str, str] = {}
    first: dict[str, int] = {}
    for line, row in csv_rows(split_csv, ("image_id", "split")):
        iid = (row.get("image_id") or "").strip()
        value = (row.get("split") or "").strip().lower()
        if not iid:
            raise DataError(f"{split_csv}, line {line}: no image_id")
        if value not in SPLITS:
            raise DataError(f"{split_csv}, line {line} ({iid}): unknown split {row.get('split')!r}; "
                            f"allowed: {', '.join(SPLITS)}")
        if iid in splits:
            raise DataError(f"{split_csv}, line {line}: {iid} is listed again (first on line {first[iid]})")
        splits[iid], first[iid] = value, line
    return splits


def load_records(data_dir: str | Path, split: str | None = None) -> list[Record]:
    """Records of a prepared dataset, sorted by image id; ``split`` in train|val|None (all).
    labels.csv and split.csv must list the same image ids, once each: anything else is a DataError
    naming the file and the id (an image left out of both would silently drop out of training)."""
    data_dir = Path(data_dir)
    labels_csv, split_csv = data_dir / "labels.csv", data_dir / "split.csv"
    for p in (labels_csv, split_csv):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: prepare the data first (python -m training.prepare ...)")
    splits = read_split(split_csv)
    records, first = [], {}
    for line, row in csv_rows(labels_csv, ("image_id", "label")):
        iid = (row.get("image_id") or "").strip()
        if not iid:
            raise DataError(f"{labels_csv}, line {line}: no image_id")
        label = parse_label(row.get("label"), labels_csv, line, iid)
        if iid in first:
            raise DataError(f"{labels_csv}, line {line}: {iid} is listed again (first on line {first[iid]})")
        first[iid] = line
        s = splits.get(iid)
        if s is None:
            raise DataError(f"{labels_csv}, line {line}: {iid} has no row in {split_csv}")
        if split is not None and s != split:
            continue
        records.append(Record(iid, label, row.get("source") or "", s,
                              data_dir / "images" / f"{iid}.png", data_dir / "masks" / f"{iid}.png"))
    unknown = [i for i in splits if i not in first]
    if unknown:
        raise DataError(f"{split_csv}: {len(unknown)} image id(s) not in {labels_csv}: {', '.join(unknown[:5])}"
                        + (" …" if len(unknown) > 5 else ""))
    return sorted(records, key=lambda r: r.image_id)


def first_of_each_class(items: list, n: int | None, label=lambda r: r.label, image_id=lambda r: r.image_id) -> list:
    """What ``--limit N`` keeps: N of ``items`` (records, or labels.csv rows with ``label`` and
    ``image_id`` given), taken from each class in turn (normal, benign, malignant; within a class by
    image id) until N are taken, and returned by image id. So a quick run or check sees every class
    the split holds; the first N by id alone were all benign on BUSI (nothing to classify, no AUC)."""
    if not n:
        return items
    rank: dict[str, int] = {}  # an item's place within its class, by image id
    keyed = []
    for item in sorted(items, key=image_id):
        c = label(item)
        keyed.append((rank.setdefault(c, 0), CLASS_NAMES.index(c) if c in CLASS_NAMES else len(CLASS_NAMES), item))
        rank[c] += 1
    return sorted((item for *_, item in sorted(keyed, key=lambda k: k[:2])[:n]), key=image_id)


def limit_records(train: list[Record], val: list[Record], limit: int | None) -> tuple[list[Record], list[Record]]:
    """``--limit N`` of training.train and training.cache: N training images and N/4 validation images
    (at least one per class, so that validation AUC is defined), each class in turn
    (``first_of_each_class``), so a cache built with a limit serves the run with that limit."""
    if not limit:
        return train, val
    return first_of_each_class(train, limit), first_of_each_class(val, max(len(CLASS_NAMES), limit // 4))


def content_sha(rec: Record) -> str:
    """sha256 of a record's prepared image and mask files (what the embedding cache was built from)."""
    h = hashlib.sha256()
    for path in (rec.image_path, rec.mask_path):
        if not path.is_file():
            raise ImageReadError(path, f"{'mask' if path == rec.mask_path else 'image'} file missing "
                                       f"for {rec.label} image {rec.image_id}")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def load_pair(rec: Record) -> tuple[np.ndarray, np.ndarray]:
    """(image array, mask uint8 {0,1}) of one record. training.prepare writes a mask for every image
    (all zero for normal ones), so a missing mask is a data error, never "no lesion"."""
    image = read_image(rec.image_path).array
    if not rec.mask_path.is_file():
        raise ImageReadError(rec.mask_path, f"mask file missing for {rec.label} image {rec.image_id} "
                                            "(training.prepare writes one for every image; prepare the data again)")
    mask = read_mask(rec.mask_path)
    if mask.shape != image.shape[:2]:
        raise ImageReadError(rec.mask_path, f"mask {mask.shape} does not match image {image.shape[:2]}")
    return image, mask
