#!/usr/bin/env bash
# One command for an offline CUDA machine reached by a single call of at most 10 minutes: it
# runs on the machine's own Python and torch, from this checkout, and every stage appends its
# result to the report (and prints it) as soon as it is known, so a call cut short still
# returns what was measured. What a reader needs first comes first.
#
#   scripts/gpu_check.sh [--stage 1|2] [--wheelhouse DIR] [--budget SECONDS] [--dry-run]
#
# --stage 1          (default) machine + versions; smoke: FlexAttention fwd+bwd vs SDPA at
#                    head_dim 256; the speed cases 1b-8k and 4b-8k (ours vs transformers + peft,
#                    both under bf16 autocast, with one profiled step each); `pytest -m "gpu and
#                    not gpu_long"` with the time left; the compile cache saved for stage 2.
# --stage 2          QLoRA 4B (needs bitsandbytes: the wheelhouse's last group), 1B-32K with
#                    gradient checkpointing, the fused-loss kernels, then `pytest -m gpu_long`.
# --wheelhouse DIR   wheels from scripts/wheelhouse.sh (any depth under DIR), installed with
#                    --no-deps --no-compile into .gpu-site/ (added to what an earlier call put
#                    there), skipping every distribution the machine already has.
# --budget SECONDS   the whole run (default 540: a 10-minute call with a minute to spare).
# --dry-run          print each stage with its budget and the total; run nothing.
#
# The report goes to $OUT/gpu_check.md when OUT is set (the folder a device call brings back),
# else gpu_check.md in the repo root. The Inductor/Triton cache goes to $OUT/compile-cache.tgz
# (when under 16 MiB); put it at .gpu-cache/compile-cache.tgz in the next call's checkout and
# that call starts warm.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
STAGE=1
WHEELS=""
BUDGET=540
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) STAGE="$2"; shift 2 ;;
    --wheelhouse) WHEELS="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (see the header of scripts/gpu_check.sh)" >&2; exit 2 ;;
  esac
done
case "$STAGE" in 1 | 2) ;; *) echo "gpu_check.sh: --stage is 1 or 2, not $STAGE" >&2; exit 2 ;; esac

# Each stage: name, seconds (its ceiling; "rest" = what is left, minus the stages after it),
# and what it runs. The budget of a stage is a ceiling enforced with timeout; time a stage does
# not use goes to the pytest stage, which takes what is left.
if [ "$STAGE" = 1 ]; then
  STAGES=(
    "machine 20 machine and versions"
    "wheels 30 install the wheelhouse"
    "smoke 60 FlexAttention fwd+bwd vs SDPA, 1B layers (head_dim 256), packed 2K row"
    "bench-1b-8k 150 1B, 1 x 8K tokens, LoRA: ours vs transformers+peft, + one profiled step"
    "bench-4b-8k 150 4B, 1 x 8K tokens, LoRA: ours vs transformers+peft, + one profiled step"
    "pytest rest pytest -m 'gpu and not gpu_long' -v, per-test timeout"
    "cache 10 save the compile cache under \$OUT"
  )
  MARK="gpu and not gpu_long"
else
  STAGES=(
    "machine 20 machine and versions"
    "wheels 40 install the wheelhouse (bitsandbytes)"
    "bench-4b-4k-qlora 130 4B, 1 x 4K tokens, QLoRA: ours vs transformers+peft"
    "bench-1b-32k-gc 130 1B, 1 x 32K tokens, LoRA, gradient checkpointing"
    "bench-loss 90 linear cross-entropy: ours vs Liger vs cut-cross-entropy"
    "pytest rest pytest -m gpu_long -v, per-test timeout"
    "cache 10 save the compile cache under \$OUT"
  )
  MARK="gpu_long"
fi
stage_budget() { # $1: stage name -> its ceiling in seconds ("rest": the budget minus the others)
  local s name secs others=0 rest=""
  for s in "${STAGES[@]}"; do
    read -r name secs _ <<<"$s"
    if [ "$secs" = rest ]; then rest=$name; else others=$((others + secs)); fi
    [ "$name" = "$1" ] && [ "$secs" != rest ] && { echo "$secs"; return; }
  done
  echo $((BUDGET - others))
}

if [ "$DRY" = 1 ]; then
  total=0
  echo "gpu_check.sh --stage $STAGE, budget $BUDGET s (dry run: nothing is run)"
  for s in "${STAGES[@]}"; do
    read -r name _ what <<<"$s"
    t=$(stage_budget "$name")
    total=$((total + t))
    printf '  %-18s %4d s  %s\n' "$name" "$t" "$what"
  done
  printf '  %-18s %4d s  (budget %d s)\n' total "$total" "$BUDGET"
  [ "$total" -le "$BUDGET" ] && [ "$(stage_budget pytest)" -ge 60 ] || {
    echo "gpu_check.sh: the stages need more than --budget $BUDGET (pytest needs 60 s)" >&2
    exit 2
  }
  exit 0
fi

START=$SECONDS
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; REPORT="$OUT/gpu_check.md"; else REPORT="$ROOT/gpu_check.md"; fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="$ROOT/.gpu-cache/inductor" TRITON_CACHE_DIR="$ROOT/.gpu-cache/triton"
MACHINE_PATH="${PYTHONPATH:-}"
SITE="$ROOT/.gpu-site"
export PYTHONPATH="$ROOT:$SITE${MACHINE_PATH:+:$MACHINE_PATH}"
export PATH="$SITE/bin:$PATH"
cd "$ROOT" || exit 1
FAILED=""

say() { echo "$*" | tee -a "$REPORT"; }  # one line to the report and to stdout
left() { echo $((BUDGET - (SECONDS - START))); }
# run_stage NAME CMD...: CMD's output to the report and stdout, under the stage's ceiling (never
# more than what is left of the budget, keeping the cache stage's share); an argument @T@
# becomes that ceiling. A failure is written down and the next stage runs.
run_stage() {
  local name=$1 t l rc=0 t0=$SECONDS a args=()
  shift
  t=$(stage_budget "$name")
  l=$(left)
  [ "$name" != cache ] && l=$((l - $(stage_budget cache)))
  [ "$name" = pytest ] && t=$l
  t=$((t < l ? t : l))
  if [ "$t" -lt 15 ]; then
    say "**$name: not run**, ${t} s of the budget left"
    FAILED+=" $name"
    return
  fi
  say "## $name (ceiling ${t} s)"
  echo >>"$REPORT"
  for a in "$@"; do args+=("${a//@T@/$t}"); done
  [ "$name" = pytest ] && echo '```' >>"$REPORT"  # pytest's lines, verbatim
  timeout -k 10 "$t" "${args[@]}" 2>&1 | tee -a "$REPORT"
  rc=${PIPESTATUS[0]}
  [ "$name" = pytest ] && echo '```' >>"$REPORT"
  echo >>"$REPORT"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    say "**$name: cut at its ${t} s** (the lines above are what finished)"
    FAILED+=" $name"
  elif [ "$rc" -ne 0 ]; then
    say "**$name: failed, exit $rc** ($((SECONDS - t0)) s)"
    FAILED+=" $name"
  else
    say "$name: done in $((SECONDS - t0)) s"
  fi
  echo >>"$REPORT"
}

echo "# gpu_check.sh --stage $STAGE, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" | tee "$REPORT"
echo >>"$REPORT"

# -- machine: stop here when there is nothing to check ----------------------------------------
if [ -f .gpu-cache/compile-cache.tgz ]; then
  tar -xzf .gpu-cache/compile-cache.tgz -C .gpu-cache && say "compile cache: restored from .gpu-cache/compile-cache.tgz"
fi
run_stage machine "$PY" scripts/gpu_check.py machine
case " $FAILED " in *" machine "*) exit 1 ;; esac

if [ -n "$WHEELS" ]; then
  run_stage wheels "$PY" scripts/gpu_check.py install "$WHEELS" "$SITE"
fi
"$PY" scripts/gpu_check.py versions 2>&1 | tee -a "$REPORT"
echo >>"$REPORT"

# -- the stages of this call ------------------------------------------------------------------
# one case of bench.py's section gpu: ours and transformers + peft, each in its own process
# with half the stage, then one profiled step of each
BENCH=("$PY" scripts/bench.py --sections gpu --impls ours,hf --steps 5 --profile --budget @T@ --no-append --cases)
if [ "$STAGE" = 1 ]; then
  run_stage smoke "$PY" scripts/gpu_check.py smoke
  run_stage bench-1b-8k "${BENCH[@]}" 1b-8k
  run_stage bench-4b-8k "${BENCH[@]}" 4b-8k
else
  run_stage bench-4b-4k-qlora "${BENCH[@]}" 4b-4k-qlora
  run_stage bench-1b-32k-gc "${BENCH[@]}" 1b-32k-gc
  run_stage bench-loss "${BENCH[@]}" loss
fi

# -- pytest: verbose, each test with its own timeout, the time that is left --------------------
TIMEOUT_FLAG=""
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_FLAG="--timeout=240"
run_stage pytest "$PY" -m pytest -m "$MARK" -v -p no:cacheprovider $TIMEOUT_FLAG -rfE \
  --tb=line --durations=10 --disable-warnings tests/test_gpu.py

# -- the compile cache, for the next call --------------------------------------------------------
if [ -n "${OUT:-}" ] && [ -d .gpu-cache ]; then
  run_stage cache "$PY" scripts/gpu_check.py save-cache .gpu-cache "$OUT/compile-cache.tgz"
fi
say "gpu_check.sh: $((SECONDS - START)) s of $BUDGET; ${FAILED:+not passed or cut short:$FAILED; }report in $REPORT"
[ -z "$FAILED" ]
