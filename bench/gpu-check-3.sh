#!/usr/bin/env bash
# Third GPU check: SAM attention through FlexAttention (score_mod, no mask, no padded head size)
# against the augmented flash form and the mask, per layer and in the whole compiled encoder;
# the device's measured bf16 matrix-product rate; the reference vs product path on this card; and
# a kernel profile of the compiled encoder. Carry carry/ as for gpu-check.sh (bench/make-carry.sh).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
exec > >(tee -a "$OUT/log3.txt") 2>&1
[ -d carry/whl ] && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site carry/whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__)"
bench() { timeout "$1" $PY -m model.benchmark --device cuda --json --peak-tflops ${PEAK_TFLOPS:-989} "${@:2}" > "$OUT/b.json" \
  && $PY -c "import json; from model.benchmark import table; print(table(json.load(open('$OUT/b.json'))))" \
  && tr -d '\n' < "$OUT/b.json" >> "$OUT/bench3.jsonl" && echo >> "$OUT/bench3.jsonl"; }
echo "== attention forms, one layer, batch 16"; timeout 120 $PY bench/attention_check.py --batch-size 16
for att in flex,bias augment,bias flex,flex; do
  echo "== batch 32, compiled, attention $att"
  bench 110 --encoder sam_vit_b --batch-size 32 --images 128 --e2e-images 0 --no-reference --compile inductor --attention $att
done
echo "== batch 16, eager, attention flex,bias, with the reference path and end to end"
bench 100 --encoder sam_vit_b --batch-size 16 --images 64 --e2e-images 64 --attention flex,bias
echo "== profile, batch 32, compiled, flex,bias"
timeout 100 $PY bench/profile_encoder.py --batch-size 32 --attention flex,bias --compile inductor --top 14
rm -f "$OUT/b.json"
