"""The prepared dataset (``training.prepare``'s output) as records and torch datasets.

Layout: ``DATA/images/<id>.png``, ``DATA/masks/<id>.png`` ({0,255}), ``DATA/labels.csv``
(image_id,label,source,original_path,patient_id), ``DATA/split.csv`` (image_id,split).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model import CLASS_NAMES
from model.io import read_image, read_mask


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


def load_records(data_dir: str | Path, split: str | None = None) -> list[Record]:
    """Records of a prepared dataset, sorted by image id; ``split`` in train|val|None (all)."""
    data_dir = Path(data_dir)
    labels_csv, split_csv = data_dir / "labels.csv", data_dir / "split.csv"
    for p in (labels_csv, split_csv):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: prepare the data first (python -m training.prepare ...)")
    with open(split_csv, newline="") as fh:
        splits = {row["image_id"]: row["split"] for row in csv.DictReader(fh)}
    records = []
    with open(labels_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            iid = row["image_id"]
            s = splits.get(iid)
            if s is None or (split is not None and s != split):
                continue
            records.append(Record(iid, row["label"], row.get("source", ""), s,
                                  data_dir / "images" / f"{iid}.png", data_dir / "masks" / f"{iid}.png"))
    return sorted(records, key=lambda r: r.image_id)


def load_pair(rec: Record) -> tuple[np.ndarray, np.ndarray]:
    """(image array, mask uint8 {0,1}) of one record."""
    image = read_image(rec.image_path).array
    mask = read_mask(rec.mask_path) if rec.mask_path.is_file() else np.zeros(image.shape[:2], np.uint8)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"{rec.mask_path}: mask {mask.shape} does not match image {image.shape[:2]}")
    return image, mask
