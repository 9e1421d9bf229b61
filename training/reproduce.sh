#!/usr/bin/env bash
# The paper's whole run: prepare -> train UNet-H, SD-H, MGC-A -> evaluate each on the validation
# split -> Table-3 comparison -> export the SD-H/MGC-A ensemble, tune its postprocessing, evaluate it.
#
#   training/reproduce.sh --busi DIR --busbra DIR [--breast DIR] [--pace DIR] OUT
#
# Environment: ENCODER (default sam_vit_b), ENCODER_CHECKPOINT (the SAM/MedSAM .pth; not needed for
# litemedsam), MODE (finetuned|frozen, default finetuned), EPOCHS (60), BATCH_SIZE (4), DEVICE (auto),
# NPROC (GPUs for torchrun, default 1), EXTRA (more training.train options, e.g. "--set ..."),
# PYTHON (the interpreter; default: the active one, else the repository's .venv, else python).
# Relative paths (the folders, OUT, ENCODER_CHECKPOINT) are taken from the folder it is run in.
set -euo pipefail
unset CDPATH  # an exported CDPATH would send the cd below elsewhere, and make it print
case "${1-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
caller="$PWD"
cd "$(dirname "$0")/.."
absolute() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$caller/$1" ;; esac; }
sources=()
while [ $# -gt 1 ]; do sources+=("$1" "$(absolute "$2")"); shift 2; done
[ $# -eq 1 ] && [[ "$1" != -* ]] || { echo "usage: $0 --busi DIR --busbra DIR [--breast DIR] [--pace DIR] OUT" >&2; exit 2; }
OUT=$(absolute "$1")
ENCODER=${ENCODER:-sam_vit_b}; MODE=${MODE:-finetuned}; EPOCHS=${EPOCHS:-60}; BATCH_SIZE=${BATCH_SIZE:-4}
DEVICE=${DEVICE:-auto}; NPROC=${NPROC:-1}; EXTRA=${EXTRA:-}
case "$MODE" in  # a misspelt MODE ran fine-tuned, and the card recorded it as given
  finetuned|frozen) ;;
  *) echo "reproduce.sh: MODE must be finetuned or frozen, not '$MODE'" >&2; exit 2 ;;
esac
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "reproduce.sh: NPROC must be a number of GPUs (1 or more), not '$NPROC'" >&2; exit 2; }
[ -n "${ENCODER_CHECKPOINT:-}" ] && ENCODER_CHECKPOINT=$(absolute "$ENCODER_CHECKPOINT")
ckpt=(); [ -n "${ENCODER_CHECKPOINT:-}" ] && ckpt=(--encoder-checkpoint "$ENCODER_CHECKPOINT")
mode=(--finetune); [ "$MODE" = frozen ] && mode=(--frozen --cache "$OUT/cache")
PY=${PYTHON:-python}
[ -z "${PYTHON:-}" ] && [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
launch=("$PY"); [ "$NPROC" -gt 1 ] && launch=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC")

"$PY" -m training.prepare "${sources[@]}" --out "$OUT/data"
for variant in unet-h sd-h mgc-a; do
  resume=(); [ -f "$OUT/runs/$variant/state.pt" ] && resume=(--resume)
  # shellcheck disable=SC2086
  "${launch[@]}" -m training.train --config "training/configs/$variant.yaml" --data "$OUT/data" \
      --out "$OUT/runs/$variant" --encoder "$ENCODER" "${ckpt[@]}" "${mode[@]}" --epochs "$EPOCHS" \
      --batch-size "$BATCH_SIZE" --device "$DEVICE" "${resume[@]}" $EXTRA
  "$PY" -m training.export "$OUT/runs/$variant" --out "$OUT/models/$variant"
  "$PY" -m training.predict --model-dir "$OUT/models/$variant" --data "$OUT/data" --split val \
      --out "$OUT/pred/$variant" -d "$DEVICE" --logits  # logits: Table 3's segmentation BCE
  "$PY" -m training.evaluate --pred "$OUT/pred/$variant" --data "$OUT/data" --split val --out "$OUT/eval/$variant"
done
"$PY" -m training.compare "$OUT/eval/unet-h" "$OUT/eval/sd-h" "$OUT/eval/mgc-a" --out "$OUT/table3.md"
# The ensemble (mask from SD-H, class from MGC-A), evaluated as the container runs it.
"$PY" -m training.export "$OUT/runs/sd-h" "$OUT/runs/mgc-a" --out "$OUT/ensemble"
"$PY" -m training.tune --model-dir "$OUT/ensemble" --data "$OUT/data" -d "$DEVICE" --write  # postprocess options
"$PY" -m training.predict --model-dir "$OUT/ensemble" --data "$OUT/data" --split val --out "$OUT/pred/ensemble" \
    -d "$DEVICE" --logits  # logits: the card's segmentation BCE
"$PY" -m training.evaluate --pred "$OUT/pred/ensemble" --data "$OUT/data" --split val --out "$OUT/eval/ensemble"
# the card's command: the environment that defined the run, every argument quoted for the shell
env_set=(ENCODER="$ENCODER" MODE="$MODE" EPOCHS="$EPOCHS" BATCH_SIZE="$BATCH_SIZE")
[ -n "${ENCODER_CHECKPOINT:-}" ] && env_set+=(ENCODER_CHECKPOINT="$ENCODER_CHECKPOINT")
[ "$NPROC" -gt 1 ] && env_set+=(NPROC="$NPROC")
[ -n "$EXTRA" ] && env_set+=(EXTRA="$EXTRA")
cmd=$(printf '%q ' "${env_set[@]}" training/reproduce.sh "${sources[@]}" "$OUT")
cmd=${cmd% }
"$PY" -m training.export "$OUT/runs/sd-h" "$OUT/runs/mgc-a" --out "$OUT/ensemble" \
    --metrics "$OUT/eval/ensemble/metrics.json" --data-report "$OUT/data/report.json" \
    --command "$cmd"
echo "done: Table 3 in $OUT/table3.md, ensemble in $OUT/ensemble"
