#!/usr/bin/env bash
# One command for a CUDA machine: the GPU tests, then the GPU benchmark, in about 8 minutes,
# with every table written to one file. It needs no network and no scripts/setup.sh: it runs
# on the machine's own Python and torch (2.11 and 2.13 seen), from this checkout.
#
#   scripts/gpu_check.sh [--wheelhouse DIR] [--out FILE] [--budget SECONDS]
#
# --wheelhouse DIR   wheels from scripts/wheelhouse.sh (any depth under DIR): installed with
#                    --no-deps into a folder of their own, put first on PYTHONPATH. Without it
#                    the packages must already be importable.
# --out FILE         where the tables go (default: gpu_check.md in the repo root).
# --budget SECONDS   total time (default 480): the tests get up to half, the bench the rest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="$ROOT/gpu_check.md"
WHEELS=""
BUDGET=480
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) WHEELS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
START=$SECONDS
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
if [ -n "$WHEELS" ]; then
  SITE="$ROOT/.gpu-site"
  rm -rf "$SITE"
  find "$WHEELS" -name '*.whl' ! -name 'gemma3_tune-*' -print0 |
    xargs -0 "$PY" -m pip install -q --no-deps --no-index --target "$SITE"
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$SITE/bin:$PATH"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'EOF' || exit 1
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device visible to this torch; nothing to check")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", file=sys.stderr)
EOF
{
  echo "# gpu_check.sh on $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))'), $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "torch $("$PY" -c 'import torch; print(torch.__version__)'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo '## pytest -m gpu'
  echo
  echo '```'
} >"$OUT"
cd "$ROOT"
set +e
timeout $((BUDGET / 2)) "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -25 >>"$OUT"
TESTS=${PIPESTATUS[0]}
set -e
echo '```' >>"$OUT"
LEFT=$((BUDGET - (SECONDS - START)))
echo >>"$OUT"
echo "## scripts/bench.py --sections gpu (${LEFT} s left)" >>"$OUT"
echo >>"$OUT"
set +e
timeout "$LEFT" "$PY" scripts/bench.py --sections gpu --steps 5 --out "$OUT" 2>&1 |
  grep -E '^(gpu |\| |### )' >>"$OUT.log"
BENCH=${PIPESTATUS[0]}
set -e
if [ "$BENCH" -ne 0 ]; then  # cut short: keep the rows measured so far
  { echo "bench stopped (exit $BENCH) after:"; echo; cat "$OUT.log"; } >>"$OUT"
fi
rm -f "$OUT.log"
echo "gpu_check.sh: tests exit $TESTS, bench exit $BENCH; tables in $OUT" >&2
[ "$TESTS" -eq 0 ] && [ "$BENCH" -eq 0 ]
