#!/usr/bin/env bash
# The project's test command: the pytest suite in test/, with the project's venv.
#   bash test/run.sh [pytest args]      (PYTHON overrides the interpreter; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" -m pytest -q test "$@"
