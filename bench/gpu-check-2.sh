#!/usr/bin/env bash
# Second, shorter GPU check (after bench/gpu-check.sh): the product path as now shipped (SAM
# attention augmented in the global blocks only), torch.compile at batch 16 and 32, and the default
# model through process.py on CUDA with the precision rule (LiteMedSAM: fp32). Carry carry/ as for
# gpu-check.sh.
LOG=log2.txt JSONL=bench2.jsonl
source "$(dirname "${BASH_SOURCE[0]}")/device-env.sh"
echo "== sam_vit_b batch 16, reference vs product"; bench 100 --encoder sam_vit_b --batch-size 16 --images 64 --e2e-images 64 --peak-tflops "$PEAK"
echo "== batch 16, compiled"; bench 120 --encoder sam_vit_b --batch-size 16 --images 64 --e2e-images 0 --no-reference --compile inductor --peak-tflops "$PEAK"
echo "== batch 32, compiled"; bench 120 --encoder sam_vit_b --batch-size 32 --images 128 --e2e-images 0 --no-reference --compile inductor --peak-tflops "$PEAK"
if [ -d carry/data ]; then
  echo "== default model, process.py on CUDA (precision auto = fp32 for LiteMedSAM), $(ls carry/data/images | wc -l) images"
  TIMEFORMAT="process.py %R s wall (start-up and model loading included)"
  time timeout 60 $PY process.py -i carry/data/images -o /tmp/pace_auto --format pace -d gpu --batch-size 16 --no-progress
fi
rm -f "$OUT/b.json"
