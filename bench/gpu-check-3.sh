#!/usr/bin/env bash
# Third GPU check: SAM attention through this project's fused Triton kernel (relative-position
# terms added inside a flash-attention loop; model/encoders/relpos_attention.py) against the
# augmented flash form and the mask, per layer and in the whole compiled encoder; the device's
# measured bf16 matrix-product rate; the reference vs product path on this card; and a kernel profile
# of the compiled encoder. Carry carry/ as for gpu-check.sh (bench/make-carry.sh).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
exec > >(tee -a "$OUT/log3.txt") 2>&1
[ -d carry/whl ] && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site carry/whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader
bench() { timeout "$1" $PY -m model.benchmark --device cuda --json --peak-tflops ${PEAK_TFLOPS:-989} "${@:2}" > "$OUT/b.json" \
  && $PY -c "import json; from model.benchmark import table; print(table(json.load(open('$OUT/b.json'))))" \
  && tr -d '\n' < "$OUT/b.json" >> "$OUT/bench3.jsonl" && echo >> "$OUT/bench3.jsonl"; }
echo "== attention forms, one layer, batch 16"; timeout 90 $PY bench/attention_check.py --batch-size 16
for att in auto augment,bias; do
  echo "== batch 32, compiled, attention $att"
  bench 100 --encoder sam_vit_b --batch-size 32 --images 128 --e2e-images 0 --no-reference --compile inductor --attention $att
done
echo "== batch 16, eager, attention auto, with the reference path and end to end"
bench 90 --encoder sam_vit_b --batch-size 16 --images 64 --e2e-images 64
echo "== profile, batch 32, compiled, auto"
timeout 90 $PY bench/profile_encoder.py --batch-size 32 --compile inductor --top 14
rm -f "$OUT/b.json"
