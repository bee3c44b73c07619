#!/usr/bin/env bash
# Create .venv and install the locked dependency set (idempotent: a second run only checks).
#
# torch is installed by pip on its own, before the lock: pip honours the machine's configuration, so a
# box that carries a CPU wheel of torch==2.13.0 (find-links) gets it, and any other box gets PyPI's
# build (CUDA on Linux, which is right on a GPU machine). Everything else comes from requirements.lock
# through uv, which resolves and installs the whole set in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import uv" 2>/dev/null; then
  "$VENV/bin/pip" install -q uv
fi
UV="$VENV/bin/python -m uv"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  "$VENV/bin/pip" install -q "torch==2.13.0"
fi
stamp="$VENV/.lock-installed"
if [ ! -f "$stamp" ] || ! cmp -s requirements.lock "$stamp"; then
  VIRTUAL_ENV="$PWD/$VENV" $UV pip install -q -r requirements.lock
  VIRTUAL_ENV="$PWD/$VENV" $UV pip install -q --no-deps -e .
  cp requirements.lock "$stamp"
fi
# bubblewrap gives the sandbox its strongest isolation tier; install it where we are allowed to.
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null) || echo "setup: bubblewrap not installed; the sandbox will use a weaker tier" >&2
fi
echo "setup: $VENV ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
