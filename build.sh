#!/usr/bin/env bash
# Build the inference image "pfsam-bus" (Grand Challenge algorithm container).
#   ./build.sh                                          # base: the official CUDA PyTorch runtime image
#   BASE_IMAGE=local/python-torch-cpu:3.11 ./build.sh   # any image with python3, pip and torch
# Extra `docker build` arguments may follow (e.g. --no-cache); -h, --help: this text.
set -euo pipefail
for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
  esac
done
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
IMAGE="${IMAGE:-pfsam-bus}"

args=()
if [ -n "${BASE_IMAGE:-}" ]; then
  args+=(--build-arg "BASE_IMAGE=${BASE_IMAGE}")
fi
if [ ! -f "$HERE/model/weights/default/ensemble.json" ]; then
  echo "build.sh: note: no model/weights/default/ensemble.json; the image will need a model mounted at /opt/ml/model" >&2
fi

start=$(date +%s)
docker build ${args[@]+"${args[@]}"} "$@" --tag "$IMAGE" "$HERE"
echo "build.sh: built $IMAGE${BASE_IMAGE:+ on $BASE_IMAGE} in $(( $(date +%s) - start ))s"
