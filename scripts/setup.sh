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
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "$HASH" > "$STAMP"
echo "setup: .venv ready" >&2
