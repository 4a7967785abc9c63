#!/usr/bin/env bash
# One command for a CUDA machine: a smoke test, the GPU tests, then the GPU benchmark, every
# stage with its own time budget and its result appended to one file as soon as it is known,
# so a call cut short still returns the numbers measured so far. It needs no network and no
# scripts/setup.sh: it runs on the machine's own Python and torch, from this checkout.
#
#   scripts/gpu_check.sh [--wheelhouse DIR] [--out FILE] [--budget SECONDS] [--cases LIST]
#
# --wheelhouse DIR   wheels from scripts/wheelhouse.sh (any depth under DIR): installed with
#                    --no-deps into .gpu-site/, put on PYTHONPATH. Wheels of torch's own
#                    dependencies (sympy, jinja2, fsspec, ...) are skipped where the machine has
#                    them, so the machine's torch keeps its own. Without it the packages must
#                    already be importable.
# --out FILE         where the results go (default: gpu_check.md in the repo root).
# --budget SECONDS   total time for the stages below (default 480; for a 10-minute call, 540:
#                    every stage stops at its share, plus up to 10 s to kill it).
# --cases LIST       bench cases, in order (default: $CASES below); see bench.py --help.
#
# Stages, in order (a stage that fails does not stop the later ones, except 1):
#   1. the machine: card, torch, CUDA, Python; a C compiler and Python.h (Triton builds its
#      launcher with them): one line saying what is missing, and stop;
#   2. smoke (20% of the budget): head_dim-256 1B layers, bf16 forward + backward with
#      FlexAttention on a packed 2K row, against SDPA;
#   3. pytest -m gpu tests/test_gpu.py (35%);
#   4. scripts/bench.py --sections gpu, one case at a time, each with its own timeout (the
#      rest, at most CASE_MAX seconds a case), in order of what a reader needs first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="$ROOT/gpu_check.md"
WHEELS=""
BUDGET=480
CASES="1b-8k,4b-4k-qlora,1b-16x512,4b-8k,1b-32k-gc,loss,cli"
CASE_MAX=240  # seconds for one bench case (four sides, two of them compiling)
CASE_MIN=60   # a case is not started with less than this left
STEPS=5
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) WHEELS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --cases) CASES="$2"; shift 2 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
START=$SECONDS
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline PYTHONUNBUFFERED=1
MACHINE_PATH="${PYTHONPATH:-}"
export PYTHONPATH="$ROOT${MACHINE_PATH:+:$MACHINE_PATH}"
cd "$ROOT"

say() {  # one line to the results file and to stderr
  echo "$*" >>"$OUT"
  echo "$*" >&2
}
left() { echo $((BUDGET - (SECONDS - START))); }
share() {  # $1 % of the budget, at most what is left, at least 1 s (timeout 0 would not stop)
  local t=$((BUDGET * $1 / 100)) l
  l=$(left)
  t=$((t < l ? t : l))
  echo $((t > 1 ? t : 1))
}
timed_out() { [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; }  # timeout's codes (137: after -k)
fence() { echo '```' >>"$OUT"; }

# -- 1. the machine ------------------------------------------------------------------------------
echo "# gpu_check.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" >"$OUT"
echo >>"$OUT"
ENV_LINE="$(timeout 60 "$PY" - 2>"$OUT.err" <<'EOF'
import platform, sys
try:
    import torch
except ImportError as e:
    sys.exit(f"gpu_check.sh: {sys.executable} cannot import torch ({e}); nothing to check")
if not torch.cuda.is_available():
    sys.exit(f"gpu_check.sh: no CUDA device visible to torch {torch.__version__}; nothing to check")
print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda},"
      f" Python {platform.python_version()} ({sys.executable})")
EOF
)" || {
  why="$(tail -1 "$OUT.err")"
  rm -f "$OUT.err"
  say "${why:-gpu_check.sh: $PY did not say within 60 s whether torch sees a CUDA device}"
  exit 1
}
rm -f "$OUT.err"
say "Machine: $ENV_LINE"

MISSING="$("$PY" - "${CC:-}" <<'EOF'
import os, platform, shutil, sys, sysconfig
cc = sys.argv[1] or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), "")
missing = []
if not (cc and shutil.which(cc.split()[0])):
    missing.append("a C compiler (cc/gcc/clang, or $CC; apt-get install gcc)")
header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
if not os.path.exists(header):
    v = ".".join(platform.python_version_tuple()[:2])
    missing.append(f"{header} (apt-get install python{v}-dev)")
print(" and ".join(missing))
EOF
)"
if [ -n "$MISSING" ]; then
  say "gpu_check.sh: Triton builds its CUDA launcher with a C compiler and Python.h; missing $MISSING"
  exit 1
fi

if [ -n "$WHEELS" ]; then
  SITE="$ROOT/.gpu-site"
  rm -rf "$SITE"
  # The wheels this machine needs: none built for another Python, and none of torch's own
  # dependencies where the machine already has them (a pinned copy first on PYTHONPATH would
  # replace what its torch was installed with).
  PICKED="$("$PY" - "$WHEELS" 2>"$OUT.err" <<'EOF'
import importlib.metadata as md, re, sys
from pathlib import Path
TORCH_OWN = {"sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec", "setuptools",
             "filelock", "typing-extensions"}
here = f"cp{sys.version_info.major}{sys.version_info.minor}"
keep, skipped = [], []
for whl in sorted(Path(sys.argv[1]).rglob("*.whl")):
    parts = whl.name[:-4].split("-")
    dist, pys, abi = re.sub(r"[-_.]+", "-", parts[0]).lower(), parts[-3].split("."), parts[-2]
    if dist == "gemma3-tune":
        continue  # this checkout is on PYTHONPATH
    if abi != "abi3" and any(p.startswith("cp") for p in pys) and here not in pys:
        sys.exit(f"gpu_check.sh: {whl.name} is built for {'/'.join(pys)} but {sys.executable} is"
                 f" {here}: rebuild with scripts/wheelhouse.sh DIR"
                 f" {sys.version_info.major}.{sys.version_info.minor}")
    if dist in TORCH_OWN:
        try:
            md.version(dist)
            skipped.append(dist)
            continue
        except md.PackageNotFoundError:
            pass
    keep.append(str(whl))
print(f"kept the machine's own {', '.join(skipped)}" if skipped else "no wheel skipped", file=sys.stderr)
print("\n".join(keep))
EOF
)" || { say "$(tail -1 "$OUT.err")"; rm -f "$OUT.err"; exit 1; }
  KEPT="$(tail -1 "$OUT.err")"
  rm -f "$OUT.err"
  if [ -n "$PICKED" ]; then
    printf '%s\n' "$PICKED" | tr '\n' '\0' |
      xargs -0 timeout 300 "$PY" -m pip install -q --no-deps --no-index --target "$SITE" ||
      { say "gpu_check.sh: pip could not install the wheelhouse into $SITE (see above)"; exit 1; }
  fi
  export PYTHONPATH="$ROOT:$SITE${MACHINE_PATH:+:$MACHINE_PATH}"
  export PATH="$SITE/bin:$PATH"
  say "Wheels: $(printf '%s\n' "$PICKED" | grep -c . || true) from $WHEELS into .gpu-site/; $KEPT"
fi
echo >>"$OUT"
FAILED=""

# -- 2. smoke: head_dim 256 through FlexAttention, forward and backward -------------------------
T=$(share 20)
echo "## smoke: 1B layers (head_dim 256), bf16, FlexAttention fwd+bwd on a packed 2K row (${T} s)" >>"$OUT"
echo >>"$OUT"
rc=0
timeout -k 10 "$T" "$PY" - >>"$OUT" 2>"$OUT.err" <<'EOF' || rc=$?
import copy, sys, time
import torch
from gemma3_tune.model.config import GLOBAL, SLIDING, preset
from gemma3_tune.model.gemma3 import Gemma3
from gemma3_tune.model.init import random_init

cfg = preset("1b").replace(num_hidden_layers=2, layer_types=[SLIDING, GLOBAL])
docs = [1024, 640, 384]  # three documents, the first longer than the 512-token window
ids = torch.randint(10, 200000, (1, sum(docs)), device="cuda")
pos = torch.cat([torch.arange(n) for n in docs])[None].cuda()
flex = random_init(Gemma3(cfg, attn_backend="flex"), seed=0).to("cuda", torch.bfloat16)
sdpa = copy.deepcopy(flex)
sdpa.attn_backend = "sdpa"

def step(model):
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    loss = model(input_ids=ids, position_ids=pos, labels=ids).loss
    loss.backward()
    torch.cuda.synchronize()
    grads = {n: p.grad.float() for n, p in model.named_parameters()}
    return time.perf_counter() - t, loss.item(), grads

first, _, _ = step(flex)  # compiles flex_attention's forward and backward kernels
again, loss, got = step(flex)
_, ref_loss, want = step(sdpa)
gmax = max(g.abs().max().item() for g in want.values())
diff = max((got[n] - want[n]).abs().max().item() for n in want) / gmax
finite = all(torch.isfinite(g).all().item() for g in got.values())
ok = finite and abs(loss - ref_loss) <= 1e-2 * max(1.0, abs(ref_loss)) and diff <= 5e-2
verdict = "matches SDPA" if ok else "DIFFERS from SDPA"
print(f"flex fwd+bwd {first:.1f} s first (compile), {again * 1000:.0f} ms after; loss {loss:.4f}"
      f" (sdpa {ref_loss:.4f}); max |grad| {gmax:.3e}, max |grad flex - sdpa| / max |grad|"
      f" {diff:.1e}{'' if finite else ', NON-FINITE grads'}: {verdict} (bf16 tolerance 5e-2)")
sys.exit(0 if ok else 1)
EOF
if [ "$rc" -ne 0 ]; then
  FAILED+=" smoke"
  if timed_out "$rc"; then
    say "smoke stopped: over its ${T} s (cold compilation of the FlexAttention kernels?)"
  else
    say "smoke failed (exit $rc): $(tail -1 "$OUT.err")"
  fi
fi
rm -f "$OUT.err"
echo >>"$OUT"

# -- 3. pytest -m gpu ----------------------------------------------------------------------------
T=$(share 35)
echo "## pytest -m gpu tests/test_gpu.py (${T} s)" >>"$OUT"
echo >>"$OUT"
fence
rc=0
timeout -k 10 "$T" "$PY" -m pytest -m gpu -q -p no:cacheprovider -rf --tb=line --durations=10 \
  --disable-warnings tests/test_gpu.py >>"$OUT" 2>&1 || rc=$?
fence
if [ "$rc" -ne 0 ]; then
  FAILED+=" pytest"
  timed_out "$rc" && say "pytest stopped: over its ${T} s (the lines above are the tests that finished)"
fi
echo >>"$OUT"

# -- 4. the bench, one case at a time ------------------------------------------------------------
echo "## scripts/bench.py --sections gpu, one case at a time" >>"$OUT"
echo >>"$OUT"
NOTES=""  # the bench's explanation goes in once, with the first case that finishes
LOG="$OUT.case"
for case in ${CASES//,/ }; do
  L=$(left)
  if [ "$L" -lt "$CASE_MIN" ]; then
    say "bench $case: not run, ${L} s of the budget left"
    FAILED+=" $case"
    continue
  fi
  T=$((L < CASE_MAX ? L : CASE_MAX))
  t0=$SECONDS
  rc=0
  timeout -k 10 "$T" "$PY" scripts/bench.py --sections gpu --cases "$case" --steps "$STEPS" \
    --worker-timeout $((T / 2)) --no-append >"$LOG" 2>"$LOG.err" || rc=$?
  echo "### $case ($((SECONDS - t0)) s of ${T} s)" >>"$OUT"
  echo >>"$OUT"
  if [ "$rc" -eq 0 ] && [ -z "$NOTES" ]; then
    sed -n '/^### /,$p' "$LOG" | tail -n +3 >>"$OUT"  # notes and table, without bench's heading
    NOTES=1
  elif [ "$rc" -eq 0 ]; then
    { grep '^|' "$LOG" || true; echo; } >>"$OUT"
  else
    FAILED+=" $case"
    if timed_out "$rc"; then
      echo "stopped: over its ${T} s; the sides that finished:" >>"$OUT"
    else
      echo "bench exit $rc: $(tail -1 "$LOG.err"); the sides that finished:" >>"$OUT"
    fi
    echo >>"$OUT"
    fence
    { grep '^gpu ' "$LOG" || true; } >>"$OUT"
    fence
    echo >>"$OUT"
  fi
done
rm -f "$LOG" "$LOG.err"
echo "gpu_check.sh: $((SECONDS - START)) s; ${FAILED:+not passed or cut short:$FAILED; }results in $OUT" >&2
[ -z "$FAILED" ]
