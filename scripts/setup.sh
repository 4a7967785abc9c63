#!/usr/bin/env bash
# Create .venv at the repo root and install gemma3-tune (with dev extras) into it.
# torch goes first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
# Idempotent: when pyproject.toml has not changed since the last install, it does nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=.venv/.gemma3-tune-installed
HASH="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  exit 0
fi
# Quiet: minus pip's warnings about this machine's local index folders, and (PYTHONWARNINGS,
# inherited by the build backend) setuptools' warning wall about editable installs.
pip_install() {
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q "$@" 2>&1 \
    | { grep -v "is ignored: it is neither" || true; }
  return "${PIPESTATUS[0]}"
}
pip_install --upgrade pip
pip_install "torch==2.13.0"
pip_install -e ".[dev]"
echo "$HASH" > "$STAMP"
echo "setup: .venv ready" >&2
