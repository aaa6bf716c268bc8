#!/usr/bin/env bash
# Install only what is missing for `make test` / `make demo`: Postgres + Redis (apt), the venv, the project.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:?VENV must name the virtual environment directory}
log() { printf '[helip] %s\n' "$*" >&2; }
# pip lists every local mirror it cannot use as a warning; they are harmless noise (the machine's package mirrors)
quiet_pip() { "$@" 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }; }

# 1. an interpreter that is new enough
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  log "no '$PYTHON' on PATH: install Python 3.11 or newer, or run: make PYTHON=/path/to/python3.11 ..."
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  log "helip needs Python >= 3.11, but $PYTHON is $("$PYTHON" -V 2>&1): run make PYTHON=/path/to/python3.11 ..."
  exit 1
fi

# 2. system packages: the test servers (tests/services.py) and, on Debian, venv support
missing=()
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ ! -x "$VENV/bin/python" ] && ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=()
  [ "$(id -u)" -eq 0 ] || { sudo -n true 2>/dev/null && SUDO=(sudo -n); } || SUDO=(none)
  if command -v apt-get >/dev/null 2>&1 && [ "${SUDO[0]-}" != none ]; then
    log "installing ${missing[*]} with apt-get"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    # keep going: only the tests that need a server fail, and they say what to do
    log "missing system packages: ${missing[*]}; install them (e.g. sudo apt-get install -y ${missing[*]})"
  fi
fi

# 3. the virtual environment, outside the clone so every clone on this machine shares the 5.6 GB install
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.helip-requirements.sha1"
WANT=$(sha1sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  log "installing requirements.txt into $VENV (first time: about 80 s and 5.6 GB)"
  quiet_pip "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt
  echo "$WANT" > "$STAMP"  # written last: an interrupted install is redone next time
fi

# 4. the project itself, editable. Source edits need no reinstall; a changed pyproject.toml (entry
#    points, packages) or another clone sharing this venv does. pip takes ~10 s here, so skip it when neither.
PROJECT_STAMP="$VENV/.helip-project"
WANT_PROJECT="$PWD $(sha1sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$PROJECT_STAMP" 2>/dev/null || true)" != "$WANT_PROJECT" ] || [ ! -x "$VENV/bin/helip" ]; then
  quiet_pip "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e . --no-deps
  echo "$WANT_PROJECT" > "$PROJECT_STAMP"
fi
