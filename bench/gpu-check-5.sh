#!/usr/bin/env bash
# Fifth GPU check (prepared in session 9, which had no device), one call of at most BUDGET seconds
# (default 480), steps in order of importance, each under its own time limit:
# (1) the toolchain probe (python -m model.toolchain) and how many graphs torch.compile makes of the
#     encoder, now and with the probe asked as before session 9 (bench/graph_breaks.py);
# (2) the compiled encoder at batch 32, now against the old probe (a graph break in every attention
#     block), in the same call: what the session-9 fix gains;
# (3) SAM's MLP with GELU in the first product's cuBLASLt epilogue against GELU as its own kernel:
#     one block, and the encoder's output difference (bench/mlp_check.py); then the compiled encoder
#     at batch 32 with it (--mlp-gelu epilogue);
# (4) end to end (decode, predict, write) at batch 16, the io pools' threads on torch's default
#     intra-op thread count (before session 10: an OpenMP team per pool thread) against one each;
# (5) one image in a fresh process with an empty Triton cache (a container job's first image), eager,
#     attention auto (the fused kernels, built and tuned first) against augment (PyTorch's flash
#     kernel): 'first batch (warm-up)' says whether single-image jobs should avoid the fused kernels;
# (6) a kernel profile of the compiled encoder, if time is left.
# Carry carry/ as for gpu-check.sh (bench/make-carry.sh, or only the two wheels). A CPU dry run:
#   DEVICE=cpu ENCODER=litemedsam IMAGES=4 PYTHON=.venv/bin/python OUT=/tmp/g5 bash bench/gpu-check-5.sh
LOG=log5.txt JSONL=bench5.jsonl
source "$(dirname "${BASH_SOURCE[0]}")/device-env.sh"
ENCODER=${ENCODER:-sam_vit_b} IMAGES=${IMAGES:-32} BUDGET=${BUDGET:-480}
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
step() { echo; echo "== $1 ($(date +%T), $(left) s left)"; }
COMPILE=(--compile inductor)
[ "$DEV" = cuda ] || COMPILE=()  # the CPU dry run checks the script, not inductor
export TRITON_CACHE_DIR=/tmp/pfsam-triton-cache-5
step "toolchain"
$PY -m model.toolchain
if [ "$DEV" = cuda ]; then
  for probe in "" --old-probe; do
    step "graphs of the compiled encoder ${probe:-(now)}"
    timeout 90 $PY bench/graph_breaks.py --device cuda $probe
  done
fi
# the benchmark with code patched first (the first argument after the time limit: Python statements)
patched_bench() { timeout "$1" $PY -c "import sys; sys.path.insert(0, 'bench'); $2
from model.benchmark import main; main()" --device "$DEV" --json "${@:3}" > "$OUT/b.json" \
  && $PY -c "import json; from model.benchmark import table; print(table(json.load(open('$OUT/b.json'))))" \
  && tr -d '\n' < "$OUT/b.json" >> "$OUT/$JSONL" && echo >> "$OUT/$JSONL"; }
ARGS=(--encoder "$ENCODER" --batch-size 32 --images $((IMAGES * 4)) --e2e-images 0 --no-reference --peak-tflops "$PEAK")
step "batch 32, compiled, the old probe (graph breaks)"
patched_bench 150 "import graph_breaks; graph_breaks.use_old_probe()" "${ARGS[@]}" "${COMPILE[@]}"
step "batch 32, compiled, now (one graph)"
bench 150 "${ARGS[@]}" "${COMPILE[@]}"
if [ "$(left)" -gt 60 ]; then
  step "MLP: GELU in the epilogue against its own kernel"
  timeout 90 $PY bench/mlp_check.py --device "$DEV" --batch-size $([ "$DEV" = cuda ] && echo 16 || echo 1) \
    --encoder-images $([ "$DEV" = cuda ] && echo 2 || echo 1)
fi
if [ "$(left)" -gt 100 ]; then
  step "batch 32, compiled, MLP GELU in the epilogue"
  bench $(( $(left) - 10 < 150 ? $(left) - 10 : 150 )) "${ARGS[@]}" "${COMPILE[@]}" --mlp-gelu epilogue
fi
for threads in default one; do
  if [ "$(left)" -gt 120 ]; then
    step "end to end, batch 16, eager, io pool threads' torch threads: $threads"
    patched_bench 110 "$([ $threads = default ] && echo 'import model.io_threads as t; t._one_torch_thread = lambda: None')" \
      --encoder "$ENCODER" --batch-size 16 --images "$IMAGES" --e2e-images $((IMAGES * 4)) --no-reference --peak-tflops "$PEAK"
  fi
done
for form in augment auto; do
  if [ "$(left)" -gt 70 ]; then
    step "one image, fresh process, empty Triton cache, eager, attention $form"
    rm -rf /tmp/pfsam-triton-cache-first
    TRITON_CACHE_DIR=/tmp/pfsam-triton-cache-first bench 60 --encoder "$ENCODER" --batch-size 1 --images 1 \
      --e2e-images 0 --no-reference --attention "$form" --peak-tflops "$PEAK"
  fi
done
if [ "$DEV" = cuda ] && [ "$(left)" -gt 100 ]; then
  step "profile, batch 32, compiled"
  timeout 90 $PY bench/profile_encoder.py --batch-size 32 --compile inductor --top 16
fi
step "done"
rm -f "$OUT/b.json"
