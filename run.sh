#!/usr/bin/env bash
# Set up (once) and run codefoundry.
#   ./run.sh speedrun [args]   default pipeline end to end (raw code -> trained model -> report)
#   ./run.sh test [pytest args] the test suite
#   ./run.sh <any codefoundry subcommand> [args]
# Creates .venv, keeps an already-installed torch >= 2.9 (GPU machines bring their own),
# otherwise installs torch==2.13.0, then installs this package with its extras (the test
# suite also installs the optional ones its tests exercise: Ray, peft, triton's interpreter).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
cmd=${1:-speedrun}; shift || true

EXTRAS="data,hf,export,quant,serve"
[ "$cmd" = test ] && EXTRAS="$EXTRAS,dev,post,cluster,fp8"

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if v >= (2, 9) else 1)' 2>/dev/null; then
    echo "[setup] keeping the installed torch; venv sees system site-packages"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
# (Re)install when pyproject.toml or the extras changed since the last install into this venv.
STAMP="$VENV/.codefoundry-installed"
WANT="$(sha1sum pyproject.toml | cut -d' ' -f1) $EXTRAS"
if ! grep -qxF "$WANT" "$STAMP" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q torch==2.13.0
  fi
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
  echo "$WANT" >> "$STAMP"
fi

case "$cmd" in
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  *)    exec "$VENV/bin/codefoundry" "$cmd" "$@" ;;
esac
