#!/usr/bin/env bash
# Build, on a machine that reaches PyPI, every wheel gemma3-tune needs beyond torch, for an
# offline GPU machine that brings its own torch. Versions are the ones this repo's .venv
# resolved (pip freeze), so the GPU machine runs what the test suite ran here.
#
#   scripts/wheelhouse.sh OUT_DIR [PYTHON_VERSION] [PLATFORM]
#   scripts/wheelhouse.sh wheels 3.12 manylinux_2_28_x86_64      # the defaults
#
# PYTHON_VERSION is the GPU machine's (`python3 -V` there), not this one's: gpu_check.sh
# refuses wheels built for another Python with a line naming the version to rebuild for.
# Wheels of torch's own dependencies (sympy, networkx, jinja2, fsspec, setuptools, ...) are
# kept for a machine that lacks them; gpu_check.sh skips them where the machine has its own.
#
# OUT_DIR gets group-1/, group-2/, ... of at most 60 MB each (bitsandbytes alone is ~43 MB), so
# each group can travel on its own; then on the GPU machine:
#   scripts/gpu_check.sh --wheelhouse OUT_DIR
# torch and its CUDA libraries (nvidia-*, triton) are left out: the GPU machine's own are used.
# DeepSpeed publishes only a source archive; it is built into a wheel here (pure Python: its
# CUDA ops compile just in time on the GPU machine).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:?usage: wheelhouse.sh OUT_DIR [PYTHON_VERSION] [PLATFORM]}" && cd "$1" && pwd)"
PYV="${2:-3.12}"
PLAT="${3:-manylinux_2_28_x86_64}"
LIMIT_MB=60
"$ROOT/scripts/setup.sh"
PY="$ROOT/.venv/bin/python"
flat="$OUT/.all"
rm -rf "$flat" "$OUT"/group-*
mkdir -p "$flat"

# Pinned list: this venv's packages minus torch's own stack and the project itself. The fused
# loss kernels that bench.py measures on CUDA (Liger, cut-cross-entropy) are added when the
# registry has them for that platform.
"$PY" -m pip freeze --exclude-editable 2>/dev/null |
  grep -v -i -E '^(torch|triton|nvidia-|gemma3-tune|gemma3-270m)' |
  sed 's/+cpu$//' >"$flat/requirements.txt"
echo "liger-kernel" >>"$flat/gpu-extra.txt"
echo "cut-cross-entropy" >>"$flat/gpu-extra.txt"

binary() {  # one pinned requirement as a wheel for the target Python/platform
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
    --platform "$PLAT" --platform manylinux2014_x86_64 --platform any -d "$flat" "$1" 2>/dev/null
}
missing=()
while read -r req; do
  [ -z "$req" ] && continue
  binary "$req" || missing+=("$req")
done <"$flat/requirements.txt"
while read -r req; do
  binary "$req" || echo "wheelhouse: no $req wheel for $PYV/$PLAT (optional: bench only)" >&2
done <"$flat/gpu-extra.txt"
# No binary for the target: build a wheel from source here (pure-Python packages only).
for req in "${missing[@]}"; do
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$flat" "$req"
  # a wheel tagged for this machine's Python would not install on the target
  if ls "$flat"/*.whl | grep -q -E "cp3[0-9]+-cp3[0-9]+-linux"; then
    echo "wheelhouse: $req has no $PYV/$PLAT wheel and is not pure Python" >&2
    exit 1
  fi
done
# gemma3-tune itself, as a wheel (gpu_check.sh also runs from the checkout without it)
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$flat" "$ROOT"

# Groups of at most LIMIT_MB, largest wheels first (first fit).
"$PY" - "$flat" "$OUT" "$LIMIT_MB" <<'EOF'
import shutil, sys
from pathlib import Path
flat, out, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) * 2**20
groups: list[list[Path]] = []
sizes: list[int] = []
for w in sorted(flat.glob("*.whl"), key=lambda p: -p.stat().st_size):
    n = w.stat().st_size
    i = next((i for i, s in enumerate(sizes) if s + n <= limit), None)
    if i is None:
        groups.append([]); sizes.append(0); i = len(groups) - 1
    groups[i].append(w); sizes[i] += n
for i, ws in enumerate(groups, 1):
    d = out / f"group-{i}"
    d.mkdir()
    for w in ws:
        shutil.move(str(w), d / w.name)
    print(f"{d}: {len(ws)} wheels, {sizes[i - 1] / 2**20:.1f} MB")
EOF
rm -rf "$flat" "$ROOT/build"  # pip wheel of the project leaves a build/ folder
