#!/usr/bin/env bash
# Build, on a machine that reaches PyPI, the wheels an offline CUDA machine lacks to run
# gemma3-tune's GPU checks, and only those: that machine brings its own Python, torch (+ triton,
# nvidia-*), transformers, peft, accelerate, numpy, pandas, pyarrow, tokenizers, ... (HAS below),
# and a wheel of one of those here would shadow its build there.
#
#   scripts/wheelhouse.sh OUT_DIR [PYTHON_VERSION] [PLATFORM]
#   scripts/wheelhouse.sh wheels 3.12 manylinux_2_28_x86_64      # the defaults
#
# It produces OUT_DIR/group-1/, group-2/, ... of at most LIMIT_MIB each (one group = one device
# call's payload), bitsandbytes alone in the last group (only the QLoRA call needs it), and
# OUT_DIR/groups.txt (each group's file count and MiB, then its wheels). Versions are the ones
# this repo's .venv has installed, so the GPU machine runs what the CPU suite tested; Liger and
# cut-cross-entropy (bench only, not in .venv) are the newest wheels, and optional.
# Wheels are binaries for PYTHON_VERSION (the GPU machine's `python3 -V`, not this one's) and
# manylinux up to PLATFORM's glibc; DeepSpeed (a source archive only) and any other
# source-only package are built here into a pure-Python wheel, or the script fails.
#
# On the GPU machine, `scripts/gpu_check.sh --wheelhouse DIR` installs every wheel under DIR
# (any depth) with `pip install --no-deps --no-compile --no-index --target .gpu-site`, adding to
# what earlier calls installed and skipping distributions the machine already has.
# Only OUT_DIR/group-*, OUT_DIR/groups.txt and OUT_DIR/.wheelhouse-tmp are rewritten.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${1:?usage: wheelhouse.sh OUT_DIR [PYTHON_VERSION] [PLATFORM]}"
PYV="${2:-3.12}"
PLAT="${3:-manylinux_2_28_x86_64}"
LIMIT_MIB=60
[[ "$PYV" =~ ^3\.[0-9]+$ ]] || { echo "wheelhouse: PYTHON_VERSION is like 3.12, not $PYV" >&2; exit 2; }
[[ "$PLAT" =~ ^manylinux_2_([0-9]+)_([a-z0-9_]+)$ ]] ||
  { echo "wheelhouse: PLATFORM is like manylinux_2_28_x86_64, not $PLAT" >&2; exit 2; }
GLIBC="${BASH_REMATCH[1]}"
ARCH="${BASH_REMATCH[2]}"
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
start=$SECONDS

# The GPU machine has these: never carried, and their own dependencies are not followed.
HAS="torch triton nvidia-* sympy networkx jinja2 fsspec filelock typing-extensions setuptools
  transformers peft accelerate numpy pandas pyarrow sentencepiece tokenizers safetensors
  huggingface-hub pyyaml packaging tqdm requests psutil pytest pytest-timeout pytest-xdist"
# What it lacks; their dependencies outside HAS are added below, at this .venv's versions.
# pillow: the data pipeline imports PIL for images. matplotlib is left out on purpose (only
# loss.png needs it, and the project copes without it).
NEED="trl datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection
  gguf hjson deepspeed bitsandbytes pillow"
OPTIONAL="liger-kernel cut-cross-entropy"  # not in .venv: newest wheel; a missing one only warns
ALONE="bitsandbytes"                        # ~41 MiB, in its own last group

# This repo's .venv as it is; scripts/setup.sh (slow) only when there is none.
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || "$ROOT/scripts/setup.sh"

TMP="$OUT/.wheelhouse-tmp"
rm -rf "$TMP" "$OUT"/group-* "$OUT/groups.txt"
mkdir -p "$TMP/dl" "$TMP/src"
trap 'rm -rf "$TMP"' EXIT

pip_q() {  # pip, quiet, minus the warnings about this machine's local index folders
  PYTHONWARNINGS=ignore "$PY" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  return "${PIPESTATUS[0]}"
}

# -- 1. the list: NEED plus its dependencies outside HAS, pinned to this .venv ------------------
"$PY" - "$PYV" "$HAS" "$NEED" >"$TMP/pins.txt" <<'EOF'
import importlib.metadata as md, sys
from fnmatch import fnmatch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as cn
pyv, has, need = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
env = {"python_version": pyv, "python_full_version": pyv + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython"}
def on_machine(name):
    return any(fnmatch(name, cn(h) if "*" not in h else h) for h in has)
def requires(name, extras=()):  # requirements that apply on the target, with these extras
    for line in md.distribution(name).requires or []:
        r = Requirement(line)
        if r.marker is None or any(r.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
            yield r
pins, todo, done = {}, [(cn(n), ()) for n in need], set()
while todo:
    name, extras = todo.pop()
    if (name, extras) in done:
        continue
    done.add((name, extras))
    try:
        version = md.version(name)
    except md.PackageNotFoundError:
        sys.exit(f"wheelhouse: {name} is needed on the GPU machine but not installed in .venv"
                 " (run scripts/setup.sh, or add it to HAS if that machine has it)")
    if on_machine(name):
        # the machine has it; only an extra's own requirements (e.g. fsspec[http]) can be missing
        base = {str(r) for r in requires(name)}
        todo += [(cn(r.name), tuple(sorted(r.extras))) for r in requires(name, extras)
                 if extras and str(r) not in base]
        continue
    pins[name] = version
    todo += [(cn(r.name), tuple(sorted(r.extras))) for r in requires(name, extras)]
print("\n".join(f"{n}=={v}" for n, v in sorted(pins.items())))
EOF
echo "wheelhouse: $(wc -l <"$TMP/pins.txt") packages for Python $PYV (+ optional: $OPTIONAL):"
sed 's/^/  /' "$TMP/pins.txt"

# -- 2. binary wheels for the target Python and manylinux, else a pure-Python build here -------
PLATS=()
for ((m = GLIBC; m >= 5; m--)); do PLATS+=("manylinux_2_${m}_$ARCH"); done
PLATS+=("manylinux2014_$ARCH" "manylinux2010_$ARCH" "manylinux1_$ARCH" any)
PLAT_ARGS=()
for p in "${PLATS[@]}"; do PLAT_ARGS+=(--platform "$p"); done
binary() {  # one requirement as a binary wheel for the target
  pip_q download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --abi "cp${PYV/./}" "${PLAT_ARGS[@]}" -d "$TMP/dl" "$1" >"$TMP/pip.log"
}
while read -r req; do
  binary "$req" && continue
  # No binary for the target (DeepSpeed: source only): build it here, pure Python only. With
  # this .venv's build tools first (DeepSpeed's setup.py imports torch), else isolated.
  name="${req%%==*}"
  echo "wheelhouse: no $PYV wheel of $req on PyPI; building it from source" >&2
  DS_BUILD_OPS=0 pip_q wheel -q --no-deps --no-build-isolation --no-binary "$name" \
    -w "$TMP/src" "$req" >"$TMP/pip.log" ||
    DS_BUILD_OPS=0 pip_q wheel -q --no-deps --no-binary "$name" -w "$TMP/src" "$req" \
      >"$TMP/pip.log" ||
    { cat "$TMP/pip.log" >&2; echo "wheelhouse: could not build $req" >&2; exit 1; }
  for w in "$TMP"/src/*.whl; do
    case "$(basename "$w")" in
      *-py3-none-any.whl | *-py2.py3-none-any.whl) mv "$w" "$TMP/dl/" ;;
      *) echo "wheelhouse: $req has no $PYV/$PLAT wheel and is not pure Python" \
           "($(basename "$w"))" >&2; exit 1 ;;
    esac
  done
done <"$TMP/pins.txt"
for req in $OPTIONAL; do
  binary "$req" || echo "wheelhouse: warning: no $req wheel for $PYV/$PLAT (optional: bench only)" >&2
done

# -- 3. checks, then groups of at most LIMIT_MIB, ALONE last --------------------------------
"$PY" - "$TMP/dl" "$OUT" "$LIMIT_MIB" "$PYV" "$HAS" "$ALONE" "${PLATS[@]}" <<'EOF'
import re, shutil, sys, zipfile
from fnmatch import fnmatch
from pathlib import Path
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name as cn, parse_wheel_filename
dl, out, limit, pyv = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) * 2**20, sys.argv[4]
has, alone, plats = sys.argv[5].split(), {cn(n) for n in sys.argv[6].split()}, sys.argv[7:]
ver = tuple(int(x) for x in pyv.split("."))
ok = set(cpython_tags(ver, [f"cp{ver[0]}{ver[1]}"], plats)) | set(
    compatible_tags(ver, f"cp{ver[0]}{ver[1]}", plats))
wheels = sorted(dl.glob("*.whl"))
names = {parse_wheel_filename(w.name)[0] for w in wheels}
env = {"python_version": pyv, "python_full_version": pyv + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
bad = []
for w in wheels:
    name, _, _, tags = parse_wheel_filename(w.name)
    if not tags & ok:
        bad.append(f"{w.name}: not installable on cp{ver[0]}{ver[1]} {plats[0]}")
    if any(fnmatch(name, h) for h in has):
        bad.append(f"{w.name}: the GPU machine has its own {name}")
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [Requirement(line.split(":", 1)[1].strip()) for line in
                    z.read(meta).decode().splitlines() if line.startswith("Requires-Dist:")]
        if name == "deepspeed":  # its CUDA ops must compile just in time there, none built here
            info = z.read("deepspeed/git_version_info_installed.py").decode()
            if re.search(r"installed_ops=.*True", info):
                bad.append(f"{w.name}: built with compiled ops")
    for r in requires:  # every dependency is carried or on the machine
        n = cn(r.name)
        if (r.marker is None or r.marker.evaluate(env)) and n not in names and not any(
                fnmatch(n, h) for h in has):
            print(f"wheelhouse: warning: {w.name} requires {r}, which is neither carried nor"
                  " on the GPU machine", file=sys.stderr)
if bad:
    sys.exit("wheelhouse: " + "\n  ".join(["refusing:", *bad]))
too_big = [w.name for w in wheels if w.stat().st_size > limit]
if too_big:
    sys.exit(f"wheelhouse: over {limit / 2**20:.0f} MiB on its own: {', '.join(too_big)}")
rest = sorted((w for w in wheels if parse_wheel_filename(w.name)[0] not in alone),
              key=lambda w: -w.stat().st_size)
groups: list[list[Path]] = []
for w in rest:  # first fit, largest first: everything in group-1 when it fits
    g = next((g for g in groups if sum(x.stat().st_size for x in g) + w.stat().st_size <= limit),
             None)
    if g is None:
        groups.append(g := [])
    g.append(w)
groups += [[w] for w in wheels if parse_wheel_filename(w.name)[0] in alone]
lines = []
for i, g in enumerate(groups, 1):
    d = out / f"group-{i}"
    d.mkdir()
    head = f"group-{i}: {len(g)} files, {sum(w.stat().st_size for w in g) / 2**20:.1f} MiB"
    print(head)
    lines.append(head)
    for w in sorted(g, key=lambda w: w.name):
        lines.append(f"  {w.name}  {w.stat().st_size / 2**20:.2f} MiB")
        shutil.move(str(w), d / w.name)
(out / "groups.txt").write_text("\n".join(lines) + "\n")
EOF
echo "wheelhouse: $OUT/group-* and groups.txt written in $((SECONDS - start)) s"
