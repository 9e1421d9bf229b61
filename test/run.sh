#!/usr/bin/env bash
# The project's test command: the pytest suite in test/, with the project's venv (created from
# requirements-dev.txt on first use, as demo.sh does).
#   bash test/run.sh [pytest args]      (PYTHON overrides the interpreter; default .venv/bin/python)
#   bash test/run.sh --slow             (also the slow tests; CI runs them)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q -r requirements-dev.txt
  fi
  PYTHON=.venv/bin/python
fi
exec "$PYTHON" -m pytest -q test "$@"
