#!/usr/bin/env bash
# (Re)generate test/expected_output.json by running process.py locally (no Docker) on test/input,
# with the model test.sh uses: model/weights/default when it exists, else (or with
# TEST_MODEL=random) the untrained test ensemble of test/make_test_model.py.
# Review the diff before committing: a changed mask or label means the model or the code changed.
set -euo pipefail
unset CDPATH  # an exported CDPATH would send the cd below elsewhere, and make it print
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TEST_MODEL="${TEST_MODEL:-auto}"
case "$TEST_MODEL" in  # as test.sh: a misspelt one fell back to another model in silence
  auto|default|random) ;;
  *) echo "make_expected.sh: TEST_MODEL must be auto, default or random, not '$TEST_MODEL'" >&2; exit 2 ;;
esac
if [ "$TEST_MODEL" = default ] && [ ! -f "$HERE/model/weights/default/ensemble.json" ]; then
  echo "make_expected.sh: TEST_MODEL=default but model/weights/default has no ensemble.json" >&2; exit 2
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$HERE/.venv/bin/python" ]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python3; fi
fi
case "$PYTHON" in /*) ;; */*) PYTHON="$PWD/$PYTHON" ;; esac  # process.py runs from the repository's root
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pfsam-expected.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
WORK="$(cd "$WORK" && pwd)"  # absolute: a relative TMPDIR is not where process.py runs

if [ "$TEST_MODEL" != random ] && [ -f "$HERE/model/weights/default/ensemble.json" ]; then
  MODEL_DIR="$HERE/model/weights/default"; KIND=default
else
  MODEL_DIR="$WORK/model"; KIND=test-random
  "$PYTHON" "$HERE/test/make_test_model.py" "$MODEL_DIR" >/dev/null
fi
SINGLE_CASE="images/breast-ultrasound-image/bus_spacing.mha"
mkdir -p "$WORK/input-single/$(dirname "$SINGLE_CASE")"
cp "$HERE/test/input/$SINGLE_CASE" "$WORK/input-single/$SINGLE_CASE"

# recorded into the work folder and moved into place only when both runs succeeded
for run in all single; do
  if [ "$run" = all ]; then in_dir="$HERE/test/input"; else in_dir="$WORK/input-single"; fi
  (cd "$HERE" && "$PYTHON" process.py -i "$in_dir" -o "$WORK/out-$run" --model-dir "$MODEL_DIR" --no-progress)
  "$PYTHON" "$HERE/test/compare_output.py" record --run "$run" --output "$WORK/out-$run" --input "$in_dir" \
      --model-dir "$MODEL_DIR" --model-kind "$KIND" --expected "$WORK/expected_output.json"
done
mv "$WORK/expected_output.json" "$HERE/test/expected_output.json"
echo "make_expected.sh: wrote test/expected_output.json (model: $KIND)"
