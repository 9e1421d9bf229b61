#!/usr/bin/env bash
# The project's test command: the pytest suite in test/, with the project's venv (created from
# requirements-dev.txt on first use, and again after an interrupted setup or a change of the requirements,
# as demo.sh does: test/ensure_venv.sh).
#   bash test/run.sh [pytest args]      (PYTHON overrides the interpreter; default .venv/bin/python)
#   bash test/run.sh --slow             (also the slow tests; CI runs them)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PYTHON:-}" ]; then
  # shellcheck source=test/ensure_venv.sh
  . test/ensure_venv.sh
  ensure_venv
  PYTHON=.venv/bin/python
fi
exec "$PYTHON" -m pytest -q test "$@"
