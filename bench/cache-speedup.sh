#!/usr/bin/env bash
# Training epoch of a frozen-encoder model from the embedding cache vs encoding every image on the
# fly, one after the other on this machine, and the ratio (docs/performance.md). The cached epoch
# takes seconds and a shared 2-core machine makes it noisy, so it runs REPEAT times (the median counts). Needs the prepared
# data and a cache holding the orig view of those images (python -m training.cache ... --first-view-only;
# --limit LIMIT encodes only the images this run reads).
#
# PRECISION (training.train's --precision, default auto): since session 49 auto runs a frozen LiteMedSAM
# in fp32 on the fly and in the cache; the recorded ratios (sessions 5 and 19) ran it in bf16: PRECISION=bf16.
#
#   [DATA=data/prepared] [CACHE=cache] [LIMIT=256] [REPEAT=3] [CONFIG=...] [PRECISION=auto] bash bench/cache-speedup.sh
set -euo pipefail
unset CDPATH  # an exported CDPATH would send the cd below elsewhere, and make it print
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-data/prepared} CACHE=${CACHE:-cache} LIMIT=${LIMIT:-256} REPEAT=${REPEAT:-3}
CONFIG=${CONFIG:-training/configs/default-sd-h.yaml} PRECISION=${PRECISION:-auto}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
run() { $PY -m training.train --config "$CONFIG" --data "$DATA" --out "$OUT/$1" --epochs 1 --limit "$LIMIT" --precision "$PRECISION" "${@:2}" \
  > "$OUT/$1.log" 2>&1 || { echo "cache-speedup.sh: training.train ($1) failed; its log ends:" >&2; tail -5 "$OUT/$1.log" >&2; exit 1; }
  $PY -c "import csv,sys; r=list(csv.DictReader(open(sys.argv[1])))[-1]; print(r['images_per_s'])" "$OUT/$1/log.csv"; }
# (inside $( ) the tail goes to stderr: the error shows, and the subshell's failure ends the script under set -e)
cached=$(for i in $(seq "$REPEAT"); do run "cached$i" --cache "$CACHE" --no-cache-build || exit 1; done)
fly=$(run on-the-fly)
$PY - "$fly" "$LIMIT" "$CONFIG" $cached <<'PY'
import statistics, sys
f, n, cfg, cached = float(sys.argv[1]), sys.argv[2], sys.argv[3], [float(v) for v in sys.argv[4:]]
c = statistics.median(cached)
print(f"{cfg}, {n} training images, 1 epoch: from the cache {c:.1f} images/s (median of "
      f"{', '.join(f'{v:.1f}' for v in cached)}), encoding on the fly {f:.2f} images/s: {c / f:.1f}x")
PY
