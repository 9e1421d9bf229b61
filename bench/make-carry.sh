#!/usr/bin/env bash
# A small prepared subset of the real data for a GPU check (bench/gpu-check.sh): ../shared does not
# travel to the device, so this copies what the check needs (<= 64 MiB) into carry/ (git-ignored).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
rm -rf carry && mkdir -p carry
$PY -m training.prepare --busi ../shared/data/BUSI --busbra ../shared/data/BUS-BRA --out carry/data --limit "${LIMIT:-60}"
du -sh carry
