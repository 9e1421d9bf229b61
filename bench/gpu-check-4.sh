#!/usr/bin/env bash
# Fourth GPU check (prepared in sessions 5-6, which had no device; run in session 8), one call of at
# most BUDGET seconds (default 540), steps in order of importance, each under its own time limit:
# (1) the attention forms per layer (bench/attention_check.py), window blocks through the fused tile
# kernel included ('fused' in its window line); (2) the whole compiled encoder at batch 32 with the
# mask form for windows (--attention fused,bias: the default before session 8) and with the tile kernel
# for windows (auto since session 8's run of this script; its figures are in the README);
# (3) the fused kernel's autotuning kept in Triton's on-disk cache: the first batch of a first and of a
# second process, from an empty cache (warm-up = tuning + compilation, then neither); (4) end to end
# through model.inference.run, reads and writes in the io threads; (5) a kernel profile of the compiled
# encoder with the faster form of (2); (6) inductor's max-autotune (Triton GEMMs with GELU and bias epilogues),
# only with the time that is left before BUDGET.
# Carry carry/ as for gpu-check.sh (bench/make-carry.sh). A CPU dry run of the script itself:
#   DEVICE=cpu ENCODER=litemedsam IMAGES=4 E2E=8 PYTHON=.venv/bin/python OUT=/tmp/g4 bash bench/gpu-check-4.sh
LOG=log4.txt JSONL=bench4.jsonl
source "$(dirname "${BASH_SOURCE[0]}")/device-env.sh"
ENCODER=${ENCODER:-sam_vit_b} IMAGES=${IMAGES:-32} E2E=${E2E:-128} BUDGET=${BUDGET:-540}
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
step() { echo; echo "== $1 ($(date +%T), $(left) s left)"; }
COMPILE=(--compile inductor)
[ "$DEV" = cuda ] || COMPILE=()  # the CPU dry run checks the script, not inductor
export TRITON_CACHE_DIR=/tmp/pfsam-triton-cache-a
if [ "$DEV" = cuda ]; then
  step "attention forms, one layer, batch 16 (window 'fused' = the tile kernel)"
  timeout 90 $PY bench/attention_check.py --batch-size 16
fi
BEST=auto BEST_RATE=0  # the faster of the two forms goes on to the profile and max-autotune
for att in fused,bias auto; do
  step "batch 32, compiled, attention $att (global,window)"
  bench 120 --encoder "$ENCODER" --batch-size 32 --images $((IMAGES * 4)) --e2e-images 0 --no-reference \
    "${COMPILE[@]}" --attention "$att" --peak-tflops "$PEAK" || continue
  rate=$($PY -c "import json; print(int(json.load(open('$OUT/b.json'))['product']['images_per_s']))")
  [ "$rate" -gt "$BEST_RATE" ] && BEST=$att BEST_RATE=$rate
done
echo "faster form at batch 32: $BEST ($BEST_RATE images/s)"
export TRITON_CACHE_DIR=/tmp/pfsam-triton-cache-b  # empty: what a fresh container starts with
rm -rf "$TRITON_CACHE_DIR"
for run in first second; do
  step "$run process (the Triton cache empty before the first): $ENCODER, batch 16, eager (see 'first batch (warm-up)')"
  bench 120 --encoder "$ENCODER" --batch-size 16 --images "$IMAGES" --e2e-images 0 --no-reference --peak-tflops "$PEAK"
done
step "end to end, batch 16, eager, $E2E generated images (decode + predict + write)"
bench 150 --encoder "$ENCODER" --batch-size 16 --images "$IMAGES" --e2e-images "$E2E" --no-reference --peak-tflops "$PEAK"
if [ "$DEV" = cuda ] && [ "$(left)" -gt 100 ]; then
  step "profile, batch 32, compiled, attention $BEST"
  timeout 90 $PY bench/profile_encoder.py --batch-size 32 --compile inductor --attention "$BEST" --top 16
fi
if [ "$DEV" = cuda ] && [ "$(left)" -gt 120 ]; then
  step "batch 32, compiled with inductor's max-autotune, attention $BEST (limit $(( $(left) - 15 )) s)"
  TORCHINDUCTOR_MAX_AUTOTUNE=1 bench $(( $(left) - 15 )) --encoder "$ENCODER" --batch-size 32 \
    --images $((IMAGES * 4)) --e2e-images 0 --no-reference --compile inductor --attention "$BEST" --peak-tflops "$PEAK"
fi
step "done"
rm -f "$OUT/b.json"
