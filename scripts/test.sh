#!/usr/bin/env bash
# Set up .venv (if needed), lint and format-check with ruff, run the whole test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` or `-m slow`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
