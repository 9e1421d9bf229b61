#!/usr/bin/env bash
# The project's test command: the pytest suite in test/, with the project's venv (created from
# requirements-dev.txt on first use, and again after an interrupted setup or a change of the requirements,
# as demo.sh does: test/ensure_venv.sh).
#   bash test/run.sh [pytest args]      (PYTHON overrides the interpreter; default .venv/bin/python)
#   bash test/run.sh --slow             (also the slow tests; CI runs them)
#   bash test/run.sh test/test_writers.py[::test_name] ...   (those alone; paths from the folder it is run in)
set -euo pipefail
unset CDPATH  # an exported CDPATH would send the cd below elsewhere, and make it print
caller="$PWD"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PYTHON:-}" ]; then
  # shellcheck source=test/ensure_venv.sh
  . test/ensure_venv.sh
  ensure_venv
  PYTHON=.venv/bin/python
fi
# the tests named (paths made absolute: the run is from the repository's root), else the whole suite
args=() named=0 previous=""
for a in "$@"; do
  opt=""
  case "$a" in  # --deselect=X and the like: X as for --deselect X
    --deselect=*|--ignore=*|--ignore-glob=*|--junitxml=*|--junit-xml=*|--log-file=*|--rootdir=*|--basetemp=*|--confcutdir=*)
      opt="${a%%=*}="; previous="${a%%=*}"; a="${a#*=}" ;;
  esac
  p="${a%%::*}"
  case "$previous" in
    -k|-m|-p|-o|-c|-W|--maxfail|--override-ini|--import-mode) kind=value ;;
    --deselect) kind=node ;;  # a test id: its path from the repository's root, where pytest runs
    --ignore|--ignore-glob|--junitxml|--junit-xml|--log-file|--rootdir|--basetemp|--confcutdir) kind=path ;;
    *) kind=arg ;;
  esac
  if [ "$kind" = node ]; then
    rel="$(realpath -m --relative-to="$PWD" "$(cd "$caller" && realpath -m "$p")")"
    a="$rel${a:${#p}}"
  elif [ "$kind" = path ]; then
    [[ "$a" = /* ]] || a="$caller/$a"
  elif [ "$kind" = arg ] && [[ "$a" != -* ]] && [ -n "$p" ] && (cd "$caller" && [ -e "$p" ]); then
    [[ "$p" = /* ]] || a="$caller/$a"
    named=1
  fi
  args+=("$opt$a")
  previous="$opt$a"
done
[ "$named" = 1 ] || args=(test ${args[@]+"${args[@]}"})
exec "$PYTHON" -m pytest -q "${args[@]}"
