#!/usr/bin/env bash
# Build the image, run it the way Grand Challenge does (no network, no capabilities, read-only root,
# non-root user, 4 GB memory) on the fixtures in test/input, and compare the outputs with
# test/expected_output.json (test/compare_output.py: masks exactly, probabilities within 1e-3).
# Four runs: "all" (every fixture at once), "single" (one .mha, as in a real Grand Challenge job,
# which adds breast-lesion-classification.json and malignancy-likelihood.json), "pace" (the PACE
# template's `python main.py ...` command: the same masks and labels as "all", in the PACE layout)
# and "compile" (the same with --compile, through the image's C/C++ toolchain, on a writable root;
# skipped for an image built with COMPILER=0, failed for one built with its toolchain that cannot build).
#
# The model: the baked-in model/weights/default when it exists; otherwise (or with TEST_MODEL=random)
# the deterministic untrained test ensemble (test/make_test_model.py), mounted read-only at
# /opt/ml/model as Grand Challenge mounts an uploaded model. Regenerate the expected output with
# test/make_expected.sh (same model choice).
#
#   ./test.sh                         # builds the image as build.sh last built it (BASE_IMAGE, --build-arg ...,
#                                     # recorded in the image), so ./build.sh ARGS && ./test.sh tests that image;
#                                     # BASE_IMAGE given here builds on that base instead (the other arguments kept)
#   SKIP_BUILD=1 ./test.sh            # reuse the image already built
# Env: IMAGE (default pfsam-bus), PYTHON (host python with numpy + SimpleITK [+ torch for the test model];
#      default .venv/bin/python), MEMORY (default 4g), CONTAINER_USER (default: the image's own user when run as root, else your uid:gid).
# No arguments (-h, --help: this text).
set -euo pipefail
unset CDPATH  # an exported CDPATH would send the cd below elsewhere, and make it print
if [ $# -gt 0 ]; then
  case "$1" in
    -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "test.sh: unknown argument '$1': it takes none; settings are environment variables (see --help)" >&2; exit 2 ;;
  esac
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
IMAGE="${IMAGE:-pfsam-bus}"
MEMORY="${MEMORY:-4g}"
TEST_MODEL="${TEST_MODEL:-auto}"
case "$TEST_MODEL" in
  auto|default|random) ;;
  *) echo "test.sh: TEST_MODEL must be auto, default or random, not '$TEST_MODEL'" >&2; exit 2 ;;
esac
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$HERE/.venv/bin/python" ]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python3; fi
fi
# as root: the image's own user (USER in the Dockerfile, as the platforms run it; the outputs' folders are
# open to it); as another user: yours, so that you can remove what the container writes
if [ -z "${CONTAINER_USER+set}" ] && [ "$(id -u)" != 0 ]; then CONTAINER_USER="$(id -u):$(id -g)"; fi
user_args=()
if [ -n "${CONTAINER_USER:-}" ]; then user_args=(--user "$CONTAINER_USER"); fi
if ! "$PYTHON" -c 'import numpy, SimpleITK' 2>/dev/null; then  # the comparison runs on the host
  echo "test.sh: $PYTHON lacks numpy or SimpleITK, which the comparison of the outputs needs: run" \
       "'bash test/run.sh' once (it creates .venv), or set PYTHON" >&2
  exit 2
fi
INPUT="$HERE/test/input"
SINGLE_CASE="images/breast-ultrasound-image/bus_spacing.mha"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  "$HERE/build.sh" --as-before  # as build.sh last built $IMAGE (BASE_IMAGE, --build-arg ...), on BASE_IMAGE where given
fi
# the image must be here (docker run would try to pull a missing one), and docker must answer
if ! why="$(docker image inspect "$IMAGE" 2>&1 >/dev/null)"; then
  echo "test.sh: FAIL: cannot use the image $IMAGE: ${why:-docker image inspect failed}" \
       "$([ "${SKIP_BUILD:-0}" = 1 ] && echo "(SKIP_BUILD=1: build it first with ./build.sh)")" >&2
  exit 1
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pfsam-test.XXXXXX")"
WORK="$(cd "$WORK" && pwd)"  # docker takes a relative -v source (a relative TMPDIR) for a volume's name
cleanup() { rm -rf "$WORK" 2>/dev/null || docker run --rm -v "$WORK":/w --entrypoint rm "$IMAGE" -rf /w/out-all /w/out-single /w/out-pace /w/out-compile || true; rm -rf "$WORK" 2>/dev/null || true; }
trap cleanup EXIT
# Ctrl-C (or SIGTERM) stops test.sh after the container it reaches: docker run forwards the signal to the
# container and then exits with the container's status, which alone would not stop the script
trap 'echo "test.sh: interrupted" >&2; exit 130' INT
trap 'echo "test.sh: stopped by SIGTERM" >&2; exit 143' TERM

model_args=()
if [ "$TEST_MODEL" != random ] && [ -f "$HERE/model/weights/default/ensemble.json" ]; then
  MODEL_DIR="$HERE/model/weights/default"
  echo "test.sh: model: the baked-in default ensemble"
else
  if [ "$TEST_MODEL" = default ]; then echo "test.sh: FAIL: TEST_MODEL=default but model/weights/default has no ensemble.json"; exit 1; fi
  MODEL_DIR="$WORK/model"
  "$PYTHON" "$HERE/test/make_test_model.py" "$MODEL_DIR" >/dev/null
  chmod -R a+rX "$WORK"
  model_args=(-v "$MODEL_DIR":/opt/ml/model:ro)
  echo "test.sh: model: the untrained test ensemble (test/make_test_model.py), mounted at /opt/ml/model"
fi

# Copies of the inputs, readable by the container's user whatever the checkout's umask.
cp -R "$INPUT" "$WORK/input-all"
mkdir -p "$WORK/input-single/$(dirname "$SINGLE_CASE")"
cp "$INPUT/$SINGLE_CASE" "$WORK/input-single/$SINGLE_CASE"
chmod -R a+rX "$WORK/input-all" "$WORK/input-single"

status=0
for run in all single; do
  in_dir="$WORK/input-$run"
  out="$WORK/out-$run"
  mkdir -p "$out"
  chmod 777 "$out"
  echo "test.sh: run '$run': docker run $IMAGE on $in_dir"
  start=$(date +%s)
  rc=0
  docker run --rm \
    --network none \
    --cap-drop ALL \
    --security-opt no-new-privileges \
    --memory "$MEMORY" --memory-swap "$MEMORY" \
    --pids-limit 256 \
    --shm-size 128m \
    --read-only \
    --tmpfs /tmp \
    ${user_args[@]+"${user_args[@]}"} \
    -v "$in_dir":/input:ro \
    -v "$out":/output \
    ${model_args[@]+"${model_args[@]}"} \
    "$IMAGE" || rc=$?
  echo "test.sh: run '$run': container exited with $rc after $(( $(date +%s) - start ))s"
  if [ "$rc" != 0 ]; then
    echo "FAIL [$run]: the container exited with status $rc"
    status=1
    continue
  fi
  "$PYTHON" "$HERE/test/compare_output.py" compare --run "$run" --output "$out" --input "$in_dir" \
      --model-dir "$MODEL_DIR" --expected "$HERE/test/expected_output.json" || status=1
done

# Run 'pace': the PACE template's command line (`python main.py -i /input -o /output -t ... -d ...`,
# -d cpu here: no GPU), through the same entry point; its masks and labels must be run 'all''s.
out="$WORK/out-pace"
mkdir -p "$out"
chmod 777 "$out"
echo "test.sh: run 'pace': docker run $IMAGE python main.py -i /input -o /output -t all -d cpu"
rc=0
docker run --rm --network none --cap-drop ALL --security-opt no-new-privileges \
  --memory "$MEMORY" --memory-swap "$MEMORY" --pids-limit 256 --shm-size 128m --read-only --tmpfs /tmp \
  ${user_args[@]+"${user_args[@]}"} -v "$WORK/input-all":/input:ro -v "$out":/output ${model_args[@]+"${model_args[@]}"} \
  "$IMAGE" python main.py -i /input -o /output -t all -d cpu --no-progress || rc=$?
if [ "$rc" != 0 ]; then
  echo "FAIL [pace]: the container exited with status $rc"
  status=1
else
  "$PYTHON" "$HERE/test/compare_output.py" pace --output "$out" --gc "$WORK/out-all" || status=1
fi

# Run 'compile': `--compile` (torch.compile; on CPU inductor builds C++ kernels) with the image's
# toolchain, on a writable root as a plain `docker run` has (a noexec /tmp, as above, cannot load
# built code: there --compile is refused with the reason). Same masks and labels as run 'all'.
# Skipped, with the reason, for an image built without a toolchain (--build-arg COMPILER=0).
out="$WORK/out-compile"
mkdir -p "$out"
chmod 777 "$out"
if why="$(docker run --rm --network none ${user_args[@]+"${user_args[@]}"} --entrypoint python3 "$IMAGE" -m model.toolchain 2>&1)"; then
  echo "test.sh: run 'compile': docker run $IMAGE python main.py -i /input -o /output -t all -d cpu --compile"
  start=$(date +%s)
  rc=0
  docker run --rm --network none --cap-drop ALL --security-opt no-new-privileges \
    --memory "$MEMORY" --memory-swap "$MEMORY" --pids-limit 256 --shm-size 128m \
    ${user_args[@]+"${user_args[@]}"} -v "$WORK/input-all":/input:ro -v "$out":/output ${model_args[@]+"${model_args[@]}"} \
    "$IMAGE" python main.py -i /input -o /output -t all -d cpu --compile --no-progress || rc=$?
  echo "test.sh: run 'compile': container exited with $rc after $(( $(date +%s) - start ))s"
  if [ "$rc" != 0 ]; then
    echo "FAIL [compile]: the container exited with status $rc"
    status=1
  else
    "$PYTHON" "$HERE/test/compare_output.py" pace --run compile --output "$out" --gc "$WORK/out-all" || status=1
  fi
elif [ "$(docker image inspect --format '{{ index .Config.Labels "org.pfsam.compiler" }}' "$IMAGE" 2>/dev/null)" = 1 ]; then
  echo "FAIL [compile]: the image was built with its toolchain (COMPILER=1), but it cannot build code:"
  echo "$why" | sed 's/^/  /'
  status=1
else
  echo "test.sh: run 'compile' skipped: the image was built without a toolchain (COMPILER=0):"
  echo "$why" | sed 's/^/  /'
fi

if [ "$status" = 0 ]; then
  echo "test.sh: PASS"
else
  echo "test.sh: FAIL"
fi
exit "$status"
