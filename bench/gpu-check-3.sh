#!/usr/bin/env bash
# Third GPU check: SAM attention through this project's fused Triton kernel (relative-position
# terms added inside a flash-attention loop; model/encoders/relpos_attention.py) against the
# augmented flash form and the mask, per layer and in the whole compiled encoder; the device's
# measured bf16 matrix-product rate; the reference vs product path on this card; and a kernel profile
# of the compiled encoder. Carry carry/ as for gpu-check.sh (bench/make-carry.sh).
LOG=log3.txt JSONL=bench3.jsonl
source "$(dirname "${BASH_SOURCE[0]}")/device-env.sh"
echo "== attention forms, one layer, batch 16"; timeout 90 $PY bench/attention_check.py --batch-size 16
for att in auto augment,bias; do
  echo "== batch 32, compiled, attention $att"
  bench 100 --encoder sam_vit_b --batch-size 32 --images 128 --e2e-images 0 --no-reference --compile inductor --attention $att --peak-tflops "$PEAK"
done
echo "== batch 16, eager, attention auto, with the reference path and end to end"
bench 90 --encoder sam_vit_b --batch-size 16 --images 64 --e2e-images 64 --peak-tflops "$PEAK"
echo "== profile, batch 32, compiled, auto"
timeout 90 $PY bench/profile_encoder.py --batch-size 32 --compile inductor --top 14
rm -f "$OUT/b.json"
