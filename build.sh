#!/usr/bin/env bash
# Build the inference image "pfsam-bus" (Grand Challenge algorithm container).
#   ./build.sh                                          # base: the official CUDA PyTorch runtime image
#   BASE_IMAGE=local/python-torch-cpu:3.11 ./build.sh   # any image with python3, pip and torch
# Extra `docker build` arguments may follow (e.g. --no-cache); -h, --help: this text.
# The image records what it was built from (BASE_IMAGE, --build-arg, --target, --platform, --file);
# --as-before builds it again from that (test.sh's and export.sh's own build, so that
# `./build.sh --build-arg USER_UID=0 && ./test.sh` tests that image); a BASE_IMAGE given then wins.
set -euo pipefail
for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
  esac
done
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
IMAGE="${IMAGE:-pfsam-bus}"
LABEL=org.pfsam.build-args

if [ "${1-}" = --as-before ]; then
  shift
  before=()
  if [ -z "${BASE_IMAGE:-}" ] && recorded="$(docker image inspect -f "{{index .Config.Labels \"$LABEL\"}}" \
      "$IMAGE" 2>/dev/null)" && [ -n "$recorded" ] && [ "$recorded" != "<no value>" ]; then
    mapfile -d '' before < <(printf '%s' "$recorded" | base64 -d)
    echo "build.sh: building $IMAGE as it was built before: ${before[*]}"
  fi
  set -- ${before[@]+"${before[@]}"} "$@"
fi

args=()
if [ -n "${BASE_IMAGE:-}" ]; then
  args+=(--build-arg "BASE_IMAGE=${BASE_IMAGE}")
fi
if [ ! -f "$HERE/model/weights/default/ensemble.json" ]; then
  echo "build.sh: note: no model/weights/default/ensemble.json; the image will need a model mounted at /opt/ml/model" >&2
fi

# What the image is built from, recorded in it (label org.pfsam.build-args: the arguments NUL-separated,
# base64-encoded; --as-before reads them back without eval): BASE_IMAGE and the --build-arg, --target,
# --platform and --file arguments, not how it is built (--no-cache, --progress ...)
what=(${args[@]+"${args[@]}"})
given=("$@")
for ((i = 0; i < ${#given[@]}; i++)); do
  case "${given[i]}" in
    --build-arg|--target|--platform|-f|--file) what+=("${given[i]}" "${given[i+1]-}"); i=$((i + 1)) ;;
    --build-arg=*|--target=*|--platform=*|--file=*) what+=("${given[i]}") ;;
  esac
done
recorded="$(if [ "${#what[@]}" -gt 0 ]; then printf '%s\0' "${what[@]}"; fi | base64 -w0)"

start=$(date +%s)
docker build ${args[@]+"${args[@]}"} "$@" --label "$LABEL=$recorded" --tag "$IMAGE" "$HERE"
echo "build.sh: built $IMAGE${BASE_IMAGE:+ on $BASE_IMAGE} in $(( $(date +%s) - start ))s"
