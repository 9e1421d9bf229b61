"""Listing the public breast-ultrasound datasets in their published layouts.

One reader per layout; each returns ``Record``s sorted by path, without decoding any pixels.
A record the reader already knows to be unusable (no label, unknown class code) carries the
reason in ``problem``; ``training.prepare`` reports it and skips it. A file the BUSI and PACE
readers leave out (not a PNG, a name the layout does not use, a mask without its image) goes to
``warn(path, reason)``; ``training.prepare`` reports it as a warning.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from model.io import list_images

LABELS = ("normal", "benign", "malignant")
SOURCES = ("BUS", "BRE", "BBR", "ABR")  # BUSI, BrEaST, BUS-BRA, and the fourth PACE source code
LABEL_CODE = {"normal": "000", "benign": "001", "malignant": "002"}
PACE_CODE_LABEL = {"000": "normal", "001": "benign", "100": "benign", "002": "malignant", "101": "malignant"}
PACE_NAME = re.compile(r"^(?:PACE|PABC)_(\d{5})_(\d{3})_([A-Z]{3})$")  # PABC: the challenge's release
MASK_FOLDERS = {"masks", "mask", "segmentation", "segmentations", "labels"}


@dataclass
class Record:
    source: str  # BUS | BRE | BBR | ABR
    label: str  # normal | benign | malignant ("" when unknown, with ``problem`` set)
    image: Path
    masks: tuple[Path, ...] = ()  # lesion masks; the lesion is their union
    patient_id: str = ""
    image_id: str = ""  # set by the PACE reader (kept ids) or by prepare (numbered ids)
    problem: str = ""


Warn = Callable[[Path, str], None]


def _no_warning(path: Path, reason: str) -> None:
    pass


def _png_files(folder: Path, warn: Warn = _no_warning, layout: str = "") -> list[Path]:
    found = [p for p in list_images(folder) if p.parent == folder]
    for p in found:
        if p.suffix.lower() != ".png":
            warn(p, f"not used: {layout} images and masks are PNG files")
    return [p for p in found if p.suffix.lower() == ".png"]


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: folder not found: {path}")
    return path


# --- BUSI: {benign,malignant,normal}/NAME.png with NAME_mask.png, NAME_mask_1.png, ... -----------
BUSI_MASK = re.compile(r"^(?P<stem>.+)_mask(?:_\d+)?$")


def read_busi(root: Path | str, warn: Warn = _no_warning) -> list[Record]:
    root = _require_dir(Path(root), "BUSI")
    records = []
    for label in LABELS:
        folder = root / label
        if not folder.is_dir():
            continue
        images, masks = [], {}
        for p in _png_files(folder, warn, "BUSI"):
            m = BUSI_MASK.match(p.stem)
            if m:
                masks.setdefault(m["stem"], []).append(p)
            else:
                images.append(p)
        for p in images:
            found = tuple(sorted(masks.get(p.stem, [])))
            problem = "" if found or label == "normal" else "lesion image without a mask"
            records.append(Record("BUS", label, p, found, problem=problem))
        stems = {p.stem for p in images}
        for stem, paths in masks.items():
            for p in paths if stem not in stems else ():
                warn(p, f"not used: a mask without its image ({stem}.png)")
    if not records:
        raise FileNotFoundError(f"BUSI: no benign/malignant/normal PNG images under {root}")
    return records


# --- BUS-BRA: Images/bus_XXXX-s.png, Masks/mask_XXXX-s.png, bus_data.csv (ID, Case, Pathology) --
def read_busbra(root: Path | str) -> list[Record]:
    root = _require_dir(Path(root), "BUS-BRA")
    table = root / "bus_data.csv"
    if not table.is_file():
        raise FileNotFoundError(f"BUS-BRA: {table} not found")
    with table.open(newline="", encoding="utf-8-sig") as fh:
        rows = {r["ID"].strip(): r for r in csv.DictReader(fh)}
    records = []
    for p in _png_files(_require_dir(root / "Images", "BUS-BRA Images")):
        row = rows.get(p.stem)
        mask = root / "Masks" / ("mask_" + p.stem.removeprefix("bus_") + p.suffix)
        label = (row or {}).get("Pathology", "").strip().lower()
        problem = ""
        if row is None:
            problem = "no row in bus_data.csv"
        elif label not in ("benign", "malignant"):
            problem, label = f"unknown Pathology {label!r} in bus_data.csv", ""
        elif not mask.is_file():
            problem = "lesion image without a mask"
        patient = (row or {}).get("Case", "").strip()
        records.append(Record("BBR", label, p, (mask,) if mask.is_file() else (), patient, problem=problem))
    return records


# --- BrEaST: BrEaST-Lesions_USG-images_and_masks/caseNNN.png + caseNNN_tumor*.png, clinical table -
BREAST_DIR = "BrEaST-Lesions_USG-images_and_masks"
BREAST_IMAGE = re.compile(r"^case(\d+)$")
BREAST_TUMOR = re.compile(r"^case(\d+)_tumor\d*$")  # caseNNN_other*.png are not lesion masks


def _breast_table(root: Path, images: Path) -> dict[int, str]:
    """CaseID -> Classification from the clinical csv (or xlsx, when openpyxl is installed)."""
    tables = sorted({*root.glob("*.csv"), *images.glob("*.csv")})
    if tables:
        with tables[0].open(newline="", encoding="utf-8-sig") as fh:
            rows = [(r.get("CaseID"), r.get("Classification")) for r in csv.DictReader(fh)]
    else:
        sheets = sorted({*root.glob("BrEaST*clinical*.xlsx"), *images.glob("BrEaST*clinical*.xlsx")})
        if not sheets:
            raise FileNotFoundError(f"BrEaST: no clinical-data csv or xlsx in {root}")
        try:
            import openpyxl
        except ImportError:
            raise RuntimeError(f"BrEaST: {sheets[0].name} is an xlsx and openpyxl is not installed; "
                               "export the sheet as csv (columns CaseID, Classification) beside it") from None
        sheet = openpyxl.load_workbook(sheets[0], read_only=True, data_only=True).worksheets[0]
        values = list(sheet.iter_rows(values_only=True))
        header = [str(h).strip() if h is not None else "" for h in values[0]]
        rows = [(dict(zip(header, v)).get("CaseID"), dict(zip(header, v)).get("Classification"))
                for v in values[1:]]
    table = {}
    for case, label in rows:
        digits = re.sub(r"\D", "", str(case or ""))
        if digits:
            table[int(digits)] = str(label or "").strip().lower()
    return table


def read_breast(root: Path | str) -> list[Record]:
    root = _require_dir(Path(root), "BrEaST")
    images = root / BREAST_DIR if (root / BREAST_DIR).is_dir() else root
    table = _breast_table(root, images)
    files = _png_files(images)
    tumors: dict[int, list[Path]] = {}
    for p in files:
        m = BREAST_TUMOR.match(p.stem)
        if m:
            tumors.setdefault(int(m[1]), []).append(p)
    records = []
    for p in files:
        m = BREAST_IMAGE.match(p.stem)
        if not m:
            continue
        case = int(m[1])
        label, masks = table.get(case, ""), tuple(sorted(tumors.get(case, [])))
        problem = ""
        if case not in table:
            problem = "no row in the clinical table"
        elif label not in LABELS:
            problem, label = f"unknown Classification {label!r}", ""
        elif label != "normal" and not masks:
            problem = "lesion image without a mask"
        records.append(Record("BRE", label, p, masks, str(case), problem=problem))
    return records


# --- PACE/PRECISE: PACE_00023_002_ABR.png or PABC_00023_002_ABR.png; masks named <id>_mask[_N].png
# anywhere, or <id>.png in a masks/ (mask/, segmentation/, labels/) folder: training.prepare's layout --
def read_pace(root: Path | str, warn: Warn = _no_warning) -> list[Record]:
    """PACE/PRECISE-named images and their masks; patient ids from a ``labels.csv`` beside them
    (``image_id,...,patient_id``: what training.prepare writes), so a re-prepared split keeps a
    patient's images together."""
    root = _require_dir(Path(root), "PACE")
    patients = {}
    if (root / "labels.csv").is_file():
        with open(root / "labels.csv", newline="", encoding="utf-8-sig") as fh:  # a byte order mark: not a name
            reader = csv.DictReader(fh)
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in reader]
            fields = [(f or "").strip().lower() for f in reader.fieldnames or []]
        if "image_id" not in fields or "patient_id" not in fields:  # the split would silently be by image
            warn(root / "labels.csv", f"no {'image_id' if 'image_id' not in fields else 'patient_id'} column "
                                      f"(header: {','.join(fields) or 'none'}): no patient ids read, so a patient's "
                                      f"images may fall on both sides of the split")
        patients = {r["image_id"]: r.get("patient_id") or "" for r in rows if r.get("image_id")}
    files = []
    for p in list_images(root):
        if p.suffix.lower() == ".png":
            files.append(p)
        else:
            warn(p, "not used: PACE images and masks are PNG files")
    masks: dict[str, list[Path]] = {}
    images = []
    for p in files:
        image_id = re.sub(r"_mask(?:_\d+)?$", "", p.stem)  # <id>_mask[_N]
        in_mask_folder = p.parent != root and p.parent.name.lower() in MASK_FOLDERS  # its own folder only
        if image_id != p.stem and PACE_NAME.match(image_id):
            masks.setdefault(image_id, []).append(p)
        elif in_mask_folder and PACE_NAME.match(p.stem):
            masks.setdefault(p.stem, []).append(p)
        else:
            images.append(p)
    records = []
    for p in images:
        m = PACE_NAME.match(p.stem)
        if not m:
            warn(p, "not used: the name is not a PACE name (PACE_<5 digits>_<class code>_<source>, or PABC_…)")
            continue
        label, source = PACE_CODE_LABEL.get(m[2], ""), m[3]
        found = tuple(sorted(masks.get(p.stem, [])))
        problem = ""
        if not label:
            problem = f"unknown class code {m[2]} in the file name"
        elif source not in SOURCES:
            problem = f"unknown source code {source} in the file name"
        elif label != "normal" and not found:
            problem = "lesion image without a mask"
        records.append(Record(source, label, p, found, patients.get(p.stem, ""), image_id=p.stem, problem=problem))
    stems = {p.stem for p in images}
    for image_id, paths in sorted(masks.items()):
        for p in paths if image_id not in stems else ():
            warn(p, f"not used: a mask without its image ({image_id}.png)")
    return records


READERS = {"busi": read_busi, "busbra": read_busbra, "breast": read_breast, "pace": read_pace}
