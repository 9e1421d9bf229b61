#!/usr/bin/env bash
# Fourth GPU check (prepared in session 5, which had no device; not yet run on a GPU): what session 5
# changed but could not measure. (1) The fused kernel's autotuning is kept in Triton's on-disk cache:
# the first batch of a first and of a second process (warm-up = tuning + compilation, then neither).
# (2) End to end through model.inference.run with the reads and writes in the io threads.
# Session 6 (no device either) added: (3) the window blocks through the fused tile kernel, per layer
# (bench/attention_check.py: 'fused' in its window line) and in the whole compiled encoder at batch 32,
# against the default (mask form for windows) in the same run. (4) With MAX_AUTOTUNE=1 only (a second
# call, if device time is left): inductor's max-autotune, which can fuse GELU into the GEMMs.
# Carry carry/ as for gpu-check.sh (bench/make-carry.sh). A CPU dry run of the script itself:
#   DEVICE=cpu ENCODER=litemedsam IMAGES=4 E2E=8 PYTHON=.venv/bin/python OUT=/tmp/g4 bash bench/gpu-check-4.sh
LOG=log4.txt JSONL=bench4.jsonl
source "$(dirname "${BASH_SOURCE[0]}")/device-env.sh"
ENCODER=${ENCODER:-sam_vit_b} IMAGES=${IMAGES:-32} E2E=${E2E:-128}
export TRITON_CACHE_DIR=/tmp/pfsam-triton-cache  # empty at the start of a fresh device
rm -rf "$TRITON_CACHE_DIR"
for run in first second; do
  echo "== $run process: $ENCODER, batch 16, eager (see 'first batch (warm-up)')"
  bench 150 --encoder "$ENCODER" --batch-size 16 --images "$IMAGES" --e2e-images 0 --no-reference --peak-tflops "$PEAK"
done
echo "== end to end, batch 16, eager, $E2E generated images (decode + predict + write)"
bench 240 --encoder "$ENCODER" --batch-size 16 --images "$IMAGES" --e2e-images "$E2E" --no-reference --peak-tflops "$PEAK"
if [ "$DEV" = cuda ]; then
  echo "== attention forms, one layer, batch 16 (window 'fused' = the tile kernel)"
  timeout 90 $PY bench/attention_check.py --batch-size 16
fi
for att in auto fused,fused; do
  echo "== batch 32, compiled, attention $att (global,window)"
  bench 120 --encoder "$ENCODER" --batch-size 32 --images $((IMAGES * 4)) --e2e-images 0 --no-reference \
    --compile inductor --attention "$att" --peak-tflops "$PEAK"
done
if [ "${MAX_AUTOTUNE:-0}" = 1 ]; then  # optional (its compilation may take minutes): a second call
  echo "== batch 32, compiled with inductor's max-autotune (Triton GEMMs with GELU and bias epilogues)"
  TORCHINDUCTOR_MAX_AUTOTUNE=1 bench 400 --encoder "$ENCODER" --batch-size 32 --images $((IMAGES * 4)) \
    --e2e-images 0 --no-reference --compile inductor --peak-tflops "$PEAK"
fi
rm -f "$OUT/b.json"
