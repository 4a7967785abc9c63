#!/usr/bin/env bash
# Quickstart: fine-tune the real Gemma 3 270M on a laptop CPU and show what it learned.
# Sets up .venv if needed, converts the packaged GGUF once (~/.cache/gemma3-tune), scores the
# base model on held-out data, trains recipes/quickstart.yaml, scores again, exports merged
# weights, and prints a before/after table with three sample replies.
# Usage: scripts/quickstart.sh [--force]   (--force replaces an existing runs/quickstart)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python scripts/quickstart.py "$@"
