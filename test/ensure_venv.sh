# shellcheck shell=bash
# Sourced by demo.sh and test/run.sh, from the repository root: `ensure_venv` makes .venv from
# requirements-dev.txt. After a successful install .venv/.requirements-dev.sha256 records that file's
# sha256; while the record is missing (a first setup that was interrupted or failed, or a .venv made
# before the record existed) or differs (the requirements changed), .venv is made anew and installed again.
ensure_venv() {
  local venv=.venv marker=.venv/.requirements-dev.sha256 want
  want="$(sha256sum requirements-dev.txt | cut -d' ' -f1)"
  if [ -x "$venv/bin/python" ] && [ "$(cat "$marker" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  rm -f "$marker"
  # emptied first: over a half-made .venv too, and pip never removes a package that the requirements
  # dropped, which code could still import here while a fresh clone (CI) lacks it
  python3 -m venv --clear "$venv"
  "$venv/bin/python" -m pip install -q -r requirements-dev.txt
  echo "$want" > "$marker"
}
