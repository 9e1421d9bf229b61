#!/usr/bin/env bash
# Build the image and export it for Grand Challenge:
#   NAME.tar.gz   the gzipped image (docker save), to upload as the algorithm's container; NAME is the
#                 image name's last path component with ':' as '_' (pfsam-bus.tar.gz; for
#                 IMAGE=ghcr.io/me/pfsam-bus:v1, pfsam-bus_v1.tar.gz)
#   model.tar.gz  the contents of model/weights/default (ensemble.json at the top level), to
#                 upload as the algorithm's model; Grand Challenge extracts it to /opt/ml/model
# It builds the image as build.sh last built it (build.sh --as-before; a BASE_IMAGE given here replaces its base).
# Refuses to run without an ensemble.json in the model folder, and when a member needs an external encoder
# checkpoint (SAM ViT, MedSAM) that is not in its folder (Grand Challenge runs offline: export with `python -m training.export ... --include-encoder-checkpoint`).
#   MODEL_DIR=runs/my-ensemble ./export.sh   # upload your own ensemble (training.export's folder) as the model
#   SKIP_BUILD=1 ./export.sh                 # reuse the image already built
#   IMAGE=pfsam-bus-cuda ./export.sh         # another image name (as build.sh's IMAGE)
# Files are written beside this script. No arguments (-h, --help: this text).
set -euo pipefail
unset CDPATH  # an exported CDPATH would send the cd below elsewhere, and make it print
if [ $# -gt 0 ]; then
  case "$1" in
    -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "export.sh: unknown argument '$1': it takes none; settings are environment variables (see --help)" >&2; exit 2 ;;
  esac
fi
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
# A member on a frozen SAM ViT / MedSAM encoder stores only its heads and loads the encoder's checkpoint at
# run time from its own folder (or the machine's checkpoint folders, which Grand Challenge does not have).
missing="$(python3 - "$MODEL_DIR" <<'EOF'
import json, os, sys
from pathlib import Path
root = Path(sys.argv[1])
path = root / "ensemble.json"
try:
    for name, sub in json.loads(path.read_text())["members"].items():
        if os.path.isabs(sub) or os.path.normpath(sub).split(os.sep)[0] == "..":
            print(f"export.sh: member {name!r} lies outside {root} ({sub}), and model.tar.gz holds that folder alone: "
                  f"export the ensemble with its members inside (python -m training.export RUN... --out DIR)")
            continue
        path = root / sub / "config.json"
        w = json.loads(path.read_text())["encoder"]["weights"]
        if w.get("source") == "checkpoint" and not w.get("included", True) and not (root / sub / str(w.get("file"))).is_file():
            print(f"export.sh: member {name!r} needs the encoder checkpoint {w.get('file')}, which is not in {root / sub}")
except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
    sys.exit(f"export.sh: {path}: not a readable model file ({type(exc).__name__}: {exc})")
EOF
)"
if [ -n "$missing" ]; then
  echo "$missing" >&2
  echo "export.sh: Grand Challenge runs the model offline with only model.tar.gz: export the ensemble again with" \
       "'python -m training.export RUN... --out $MODEL_DIR --include-encoder-checkpoint' (copies the checked" \
       "file into the member's folder), or copy the file there yourself" >&2
  exit 1
fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  "$HERE/build.sh" --as-before  # as build.sh last built $IMAGE (BASE_IMAGE, --build-arg ...), on BASE_IMAGE where given
fi

# the image's file: its name's last path component, ':' (a tag) as '_' (ghcr.io/me/pfsam-bus:v1 -> pfsam-bus_v1)
IMAGE_FILE="${IMAGE##*/}"
IMAGE_FILE="${IMAGE_FILE//:/_}.tar.gz"
# a failed save or tar leaves no multi-GB temporary file behind
trap 'rm -f "$HERE/$IMAGE_FILE.tmp" "$HERE/model.tar.gz.tmp"' EXIT
start=$(date +%s)
docker save "$IMAGE" | gzip -c > "$HERE/$IMAGE_FILE.tmp"
mv "$HERE/$IMAGE_FILE.tmp" "$HERE/$IMAGE_FILE"
# --dereference: a linked file (a checkpoint linked into a member's folder) goes in as the file, not as a
# link that points nowhere on Grand Challenge
tar --sort=name --owner=0 --group=0 --numeric-owner --mode=u=rwX,go=rX --exclude=__pycache__ --dereference \
    -C "$MODEL_DIR" -czf "$HERE/model.tar.gz.tmp" .
mv "$HERE/model.tar.gz.tmp" "$HERE/model.tar.gz"
echo "export.sh: $(du -h "$HERE/$IMAGE_FILE" | cut -f1) $IMAGE_FILE, $(du -h "$HERE/model.tar.gz" | cut -f1) model.tar.gz ($(( $(date +%s) - start ))s)"
