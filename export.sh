#!/usr/bin/env bash
# Build the image and export it for Grand Challenge:
#   pfsam-bus.tar.gz  the gzipped image (docker save), to upload as the algorithm's container
#   model.tar.gz      the contents of model/weights/default (ensemble.json at the top level), to
#                     upload as the algorithm's model; Grand Challenge extracts it to /opt/ml/model
# BASE_IMAGE passes through to build.sh. Refuses to run without an ensemble.json in the model folder.
#   MODEL_DIR=runs/my-ensemble ./export.sh   # upload your own ensemble (training.export's folder) as the model
#   SKIP_BUILD=1 ./export.sh                 # reuse the image already built
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
IMAGE="${IMAGE:-pfsam-bus}"
MODEL_DIR="${MODEL_DIR:-$HERE/model/weights/default}"
if [ ! -d "$MODEL_DIR" ]; then
  echo "export.sh: model folder $MODEL_DIR does not exist" >&2
  exit 1
fi
MODEL_DIR="$(cd "$MODEL_DIR" && pwd)"

if [ ! -f "$MODEL_DIR/ensemble.json" ]; then
  echo "export.sh: no $MODEL_DIR/ensemble.json: export an ensemble there first (python -m training.export)" >&2
  exit 1
fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  "$HERE/build.sh"
fi

# a failed save or tar leaves no multi-GB temporary file behind
trap 'rm -f "$HERE/$IMAGE.tar.gz.tmp" "$HERE/model.tar.gz.tmp"' EXIT
start=$(date +%s)
docker save "$IMAGE" | gzip -c > "$HERE/$IMAGE.tar.gz.tmp"
mv "$HERE/$IMAGE.tar.gz.tmp" "$HERE/$IMAGE.tar.gz"
tar --sort=name --owner=0 --group=0 --numeric-owner --mode=u=rwX,go=rX --exclude=__pycache__ \
    -C "$MODEL_DIR" -czf "$HERE/model.tar.gz.tmp" .
mv "$HERE/model.tar.gz.tmp" "$HERE/model.tar.gz"
echo "export.sh: $(du -h "$HERE/$IMAGE.tar.gz" | cut -f1) $IMAGE.tar.gz, $(du -h "$HERE/model.tar.gz" | cut -f1) model.tar.gz ($(( $(date +%s) - start ))s)"
