#!/usr/bin/env bash
# Set up .venv (if needed), lint and format-check with ruff, run the tests.
#   scripts/test.sh            the whole suite (what CI runs; goal: 10 minutes on a 2-core CPU)
#   scripts/test.sh --fast     the fast tier, after every change (goal: 3 minutes): everything
#                              not marked `slow` (the real 270M, multi-process launches, the
#                              longest runs); one tiny training run of each method stays in it
# Extra arguments go to pytest, e.g. `scripts/test.sh tests/test_loss.py -x`. The last line
# says how long the run took against its goal (tests/DURATIONS.md has the slowest tests).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
GOAL=600
TIER=(--durations=15)
if [ "${1:-}" = "--fast" ]; then
  shift
  GOAL=180
  TIER=(-m "not slow" --durations=5)
fi
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Two pytest-xdist workers, a test file each at a time (module fixtures are built once):
# measured 691 -> 549 s for the whole suite on 2 cores (tests/DURATIONS.md).
PARALLEL=()
[ "$(nproc)" -ge 2 ] && PARALLEL=(-n 2 --dist loadfile)
start=$SECONDS
rc=0
.venv/bin/python -m pytest "${PARALLEL[@]}" "${TIER[@]}" "$@" || rc=$?
took=$((SECONDS - start))
verdict="within"
[ "$took" -gt "$GOAL" ] && verdict="OVER"
echo "scripts/test.sh: pytest took ${took} s, $verdict the ${GOAL} s goal of this tier"
exit "$rc"
