#!/usr/bin/env bash
# Build the inference image "pfsam-bus" (Grand Challenge algorithm container).
#   ./build.sh                                          # base: the official CUDA PyTorch runtime image
#   BASE_IMAGE=local/python-torch-cpu:3.11 ./build.sh   # any image with python3, pip and torch
# Extra `docker build` arguments may follow (e.g. --no-cache); -h, --help: this text.
# The image records what it was built from (BASE_IMAGE, --build-arg, --target, --platform, --file);
# --as-before builds it again from that (test.sh's and export.sh's own build, so that
# `./build.sh --build-arg USER_UID=0 && ./test.sh` tests that image); a BASE_IMAGE given then replaces
# the recorded base, the other recorded arguments kept. A proxy's --build-arg is recorded by its name alone,
# a --file by its absolute path.
set -euo pipefail
unset CDPATH  # an exported CDPATH would send the cd below elsewhere, and make it print
for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
  esac
done
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
IMAGE="${IMAGE:-pfsam-bus}"
LABEL=org.pfsam.build-args

as_before=
given=()
for arg in "$@"; do  # --as-before wherever it stands
  if [ "$arg" = --as-before ]; then as_before=1; else given+=("$arg"); fi
done
set -- ${given[@]+"${given[@]}"}

if [ -n "$as_before" ]; then
  before=()
  if recorded="$(docker image inspect -f "{{index .Config.Labels \"$LABEL\"}}" "$IMAGE" 2>/dev/null)" \
      && [ -n "$recorded" ] && [ "$recorded" != "<no value>" ]; then
    mapfile -d '' recorded_args < <(printf '%s' "$recorded" | base64 -d)
    for ((i = 0; i < ${#recorded_args[@]}; i++)); do  # a BASE_IMAGE given now replaces the recorded one alone
      a="${recorded_args[i]}"
      if [ -n "${BASE_IMAGE:-}" ] && [ "$a" = --build-arg ] && [[ "${recorded_args[i+1]-}" == BASE_IMAGE=* ]]; then
        i=$((i + 1)); continue
      fi
      if [ -n "${BASE_IMAGE:-}" ] && [[ "$a" == --build-arg=BASE_IMAGE=* ]]; then continue; fi
      before+=("$a")
    done
    echo "build.sh: building $IMAGE as it was built before${BASE_IMAGE:+, on $BASE_IMAGE}: ${BASE_IMAGE:+--build-arg BASE_IMAGE=$BASE_IMAGE }${before[*]}"
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
# --platform and --file arguments, not how it is built (--no-cache, --progress ...). A proxy's value is
# not recorded, only its name (docker then takes it from the environment again): it may hold a password,
# and the label goes out with the image (export.sh), where docker keeps its own proxy arguments out of
# the image's history for that reason.
unvalued() {  # --build-arg NAME=VALUE -> NAME for docker's predefined proxy arguments, else as given
  local name="${1%%=*}"
  case "${name^^}" in
    HTTP_PROXY|HTTPS_PROXY|FTP_PROXY|NO_PROXY|ALL_PROXY) printf '%s' "$name" ;;
    *) printf '%s' "$1" ;;
  esac
}
absolute() {  # a Dockerfile path as docker reads it (from this folder), for --as-before run from another
  case "$1" in
    -|/*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "$1" ;;
  esac
}
what=(${args[@]+"${args[@]}"})
given=("$@")
for ((i = 0; i < ${#given[@]}; i++)); do
  case "${given[i]}" in
    --build-arg) what+=(--build-arg "$(unvalued "${given[i+1]-}")"); i=$((i + 1)) ;;
    --target|--platform) what+=("${given[i]}" "${given[i+1]-}"); i=$((i + 1)) ;;
    -f|--file) what+=("${given[i]}" "$(absolute "${given[i+1]-}")"); i=$((i + 1)) ;;
    --build-arg=*) what+=("--build-arg=$(unvalued "${given[i]#--build-arg=}")") ;;
    --target=*|--platform=*) what+=("${given[i]}") ;;
    --file=*) what+=("--file=$(absolute "${given[i]#--file=}")") ;;
  esac
done
recorded="$(if [ "${#what[@]}" -gt 0 ]; then printf '%s\0' "${what[@]}"; fi | base64 -w0)"

start=$(date +%s)
docker build ${args[@]+"${args[@]}"} "$@" --label "$LABEL=$recorded" --tag "$IMAGE" "$HERE"
echo "build.sh: built $IMAGE${BASE_IMAGE:+ on $BASE_IMAGE} in $(( $(date +%s) - start ))s"
