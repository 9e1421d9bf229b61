# Sourced by the GPU checks (bench/gpu-check*.sh) on the device machine: LOG and JSONL name their
# files under $OUT. Goes to the repository root, installs the carried wheels, logs everything to
# $OUT/$LOG, prints the card and torch, and defines bench() (model.benchmark as JSON, appended to
# $OUT/$JSONL and printed as a table; the first argument is its time limit in seconds).
set -uo pipefail
unset CDPATH  # an exported CDPATH would send the cd below elsewhere, and make it print
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-check}
DEV=${DEVICE:-cuda}
PEAK=${PEAK_TFLOPS:-989}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
exec > >(tee -a "$OUT/$LOG") 2>&1
if [ -d carry/whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site carry/whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm,driver_version --format=csv,noheader
$PY -c "import torch, os; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cpus', os.cpu_count())"
bench() { timeout "$1" $PY -m model.benchmark --device "$DEV" --json "${@:2}" > "$OUT/b.json" \
            && $PY -c "import json; from model.benchmark import table; print(table(json.load(open('$OUT/b.json'))))" \
            && tr -d '\n' < "$OUT/b.json" >> "$OUT/$JSONL" && echo >> "$OUT/$JSONL"; }
