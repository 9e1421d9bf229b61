#!/usr/bin/env bash
# GPU check for a lent H100/H200, one call of under 8 minutes. Prepare on the development machine:
#
#   bash bench/make-carry.sh      # -> carry/: stratified real-data subset (132 images) + 2 wheels
#   # device: run `bash bench/gpu-check.sh` with carry/ carried; results in $OUT (log.txt, bench.jsonl, ...)
#
# Steps, most important first (each under its own time limit, so one failure costs only itself):
#  0. SAM attention kernels (bench/attention_check.py)
#  1. sam_vit_b @1024 ensemble, reference vs product, batch 1 and 16 (+ end to end through model.inference)
#  2. the default model (LiteMedSAM) through process.py on the carried images: fp32 vs bf16 agreement
#     and throughput; its benchmark at batch 16
#  3. fine-tuning sam_vit_b @1024 (random init: no SAM checkpoint on the device) and LiteMedSAM
#     (real weights) for a few epochs on the carried subset: throughput and validation metrics
#  4. product path variants at batch 16: attention as an additive mask (no flash), torch.compile
LOG=log.txt JSONL=bench.jsonl
source "$(dirname "${BASH_SOURCE[0]}")/device-env.sh"
step() { echo; echo "== $1 ($(date +%T))"; }
util() {  # sample GPU utilisation every 0.5 s while a training step runs: is the GPU starved for data?
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/$1" 2>/dev/null &
  UTIL_PID=$!
}
util_done() {
  kill $UTIL_PID 2>/dev/null; wait $UTIL_PID 2>/dev/null
  awk -F, '{s+=$1; n++; if ($1>=50) b++} END {if (n) printf "GPU utilisation: mean %.0f%%, >=50%% in %d of %d samples\n", s/n, b, n}' "$OUT/$1"
}

step "0 SAM attention: augmented form on the flash kernel? equal to the mask form? per-layer time"
timeout 60 $PY bench/attention_check.py --device "$DEV" --batch-size 16

step "1a sam_vit_b @1024, batch 1"
bench 120 --encoder sam_vit_b --batch-size 1 --images ${IMAGES_B1:-32} --e2e-images ${E2E:-16} --peak-tflops $PEAK
step "1b sam_vit_b @1024, batch 16"
bench 150 --encoder sam_vit_b --batch-size ${BS16:-16} --images ${IMAGES_B16:-64} --e2e-images ${E2E16:-64} --peak-tflops $PEAK

if [ -d carry/data ]; then
  step "2a default model through process.py on $(ls carry/data/images | wc -l) real images: fp32, bf16"
  TIMEFORMAT="process.py %R s wall (model loading included)"
  for p in fp32 bf16; do
    echo "precision $p:"
    time timeout 90 $PY process.py -i carry/data/images -o "/tmp/pace_$p" --format pace \
        -d $([ "$DEV" = cuda ] && echo gpu || echo cpu) --precision $p --batch-size 16 --no-progress
  done
  timeout 30 $PY bench/agreement.py /tmp/pace_fp32 /tmp/pace_bf16 --json "$OUT/agreement.json"
fi
step "2b litemedsam benchmark, batch 16"
bench 90 --encoder litemedsam --batch-size 16 --images 128 --e2e-images ${E2E:-16} --peak-tflops $PEAK

if [ -d carry/data ]; then
  step "3a fine-tune sam_vit_b @1024 (random init), ${FT_EPOCHS:-2} epochs on carry/data"
  util util-vitb.txt
  timeout 150 $PY -m training.train --config training/configs/mgc-a.yaml --data carry/data --out /tmp/ft-vitb \
      --epochs ${FT_EPOCHS:-2} --batch-size 8 --device "$DEV" --workers 8 --set model.encoder_weights=random \
      --set "curriculum={gt_until: 1, mixed_until: 1, p_gt: 0.5}" ${FT_LIMIT:+--limit $FT_LIMIT} 2>&1 | grep -v "it/s\]"
  util_done util-vitb.txt
  cp /tmp/ft-vitb/log.csv "$OUT/finetune-vitb.csv" 2>/dev/null && cat "$OUT/finetune-vitb.csv"
  step "3b fine-tune LiteMedSAM (real weights) @256, ${FT_EPOCHS_LITE:-4} epochs on carry/data"
  util util-lite.txt
  timeout 100 $PY -m training.train --config training/configs/default-mgc-a.yaml --data carry/data --out /tmp/ft-lite \
      --finetune --epochs ${FT_EPOCHS_LITE:-4} --batch-size 16 --lr 1e-4 --device "$DEV" --workers 8 \
      --set "curriculum={gt_until: 2, mixed_until: 3, p_gt: 0.5}" ${FT_LIMIT:+--limit $FT_LIMIT} 2>&1 | grep -v "it/s\]"
  util_done util-lite.txt
  cp /tmp/ft-lite/log.csv "$OUT/finetune-lite.csv" 2>/dev/null && cat "$OUT/finetune-lite.csv"
fi

step "4a sam_vit_b batch 16, attention as an additive mask (no flash kernel)"
bench 90 --encoder sam_vit_b --batch-size ${BS16:-16} --images ${IMAGES_B16:-64} --e2e-images 0 --no-reference --attention bias --peak-tflops $PEAK
step "4b sam_vit_b batch 16, torch.compile (inductor)"
bench ${COMPILE_S:-200} --encoder sam_vit_b --batch-size ${BS16:-16} --images ${IMAGES_B16:-64} --e2e-images 0 --no-reference --compile inductor --peak-tflops $PEAK
step "done"
rm -f "$OUT/b.json"
