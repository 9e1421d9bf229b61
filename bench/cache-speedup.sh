#!/usr/bin/env bash
# Training epoch of a frozen-encoder model from the embedding cache vs encoding every image on the
# fly, one after the other on this machine, and the ratio (README, Performance). Needs the prepared
# data and a cache holding the orig view of those images (python -m training.cache ... --first-view-only).
#
#   bash bench/cache-speedup.sh [DATA=data/prepared] [CACHE=cache] [LIMIT=256] [CONFIG=...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-data/prepared} CACHE=${CACHE:-cache} LIMIT=${LIMIT:-256}
CONFIG=${CONFIG:-training/configs/default-sd-h.yaml}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
run() { $PY -m training.train --config "$CONFIG" --data "$DATA" --out "$OUT/$1" --epochs 1 --limit "$LIMIT" "${@:2}" \
  > "$OUT/$1.log" 2>&1 || { tail -5 "$OUT/$1.log"; exit 1; }
  $PY -c "import csv,sys; r=list(csv.DictReader(open(sys.argv[1])))[-1]; print(r['images_per_s'])" "$OUT/$1/log.csv"; }
cached=$(run cached --cache "$CACHE" --no-cache-build)
fly=$(run on-the-fly)
$PY - "$cached" "$fly" "$LIMIT" "$CONFIG" <<'PY'
import sys
c, f, n, cfg = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
print(f"{cfg}, {n} training images, 1 epoch: from the cache {c:.1f} images/s, encoding on the fly {f:.2f} images/s: {c / f:.1f}x")
PY
