"""The Python side of scripts/gpu_check.sh, one subcommand per stage that is not pytest or the
bench, so that each prints a few lines a reader can act on and exits non-zero on failure:

    python scripts/gpu_check.py machine            card, torch, CUDA, Python; C compiler, Python.h
    python scripts/gpu_check.py install WHEELS SITE the wheels the machine lacks, into SITE
    python scripts/gpu_check.py versions           the packages a run imports, and from where
    python scripts/gpu_check.py smoke              FlexAttention fwd+bwd vs SDPA at head_dim 256
    python scripts/gpu_check.py save-cache DIR FILE the compile cache, if it fits a device call
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

# The packages a run imports beyond torch, in the order a reader looks for them.
PACKAGES = ("transformers", "peft", "accelerate", "trl", "datasets", "pydantic", "deepspeed",
            "bitsandbytes", "gguf", "safetensors", "liger-kernel", "cut-cross-entropy")  # fmt: skip
RETURN_LIMIT = 16 * 2**20  # the largest file a device call brings back from $OUT


def machine() -> int:
    try:
        import torch
    except ImportError as e:
        print(f"gpu_check: {sys.executable} cannot import torch ({e}); nothing to check")
        return 1
    if not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA device; nothing to check")
        return 1
    props = torch.cuda.get_device_properties(0)
    print(
        f"Machine: {props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor},"
        f" {torch.cuda.device_count()} visible; torch {torch.__version__}, CUDA {torch.version.cuda},"
        f" Python {platform.python_version()} ({sys.executable}), {os.cpu_count()} CPUs"
    )
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        print(f"nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
    missing = []
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), "")
    if not (cc and shutil.which(cc.split()[0])):
        missing.append("a C compiler (cc/gcc/clang, or $CC; apt-get install gcc)")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.exists():
        missing.append(
            f"{header} (apt-get install python{sys.version_info[0]}.{sys.version_info[1]}-dev)"
        )
    if missing:
        print(
            f"gpu_check: Triton builds its launcher with a C compiler and Python.h; missing {' and '.join(missing)}"
        )
        return 1
    return 0


def _dist(wheel: Path) -> tuple[str, list[str], str]:
    """(normalised distribution name, python tags, abi tag) of a wheel file name."""
    parts = wheel.name[:-4].split("-")
    return re.sub(r"[-_.]+", "-", parts[0]).lower(), parts[-3].split("."), parts[-2]


def _installed(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def pick_wheels(wheels: Path) -> tuple[list[Path], list[str]]:
    """The wheels under `wheels` this machine lacks, and the ones it already has ('name ver').
    A distribution the machine has (its own, or one an earlier call put in the site folder,
    which is on PYTHONPATH) is kept as it is: its torch was installed with those versions."""
    here = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    keep, have = [], []
    for whl in sorted(wheels.rglob("*.whl")):
        dist, pys, abi = _dist(whl)
        if abi != "abi3" and any(p.startswith("cp") for p in pys) and here not in pys:
            raise SystemExit(
                f"gpu_check: {whl.name} is built for {'/'.join(pys)} but {sys.executable} is"
                f" {here}: rebuild with scripts/wheelhouse.sh DIR {sys.version_info[0]}.{sys.version_info[1]}"
            )
        if dist == "gemma3-tune":
            continue  # the checkout itself is on PYTHONPATH
        if version := _installed(dist):
            have.append(f"{dist} {version}")
        else:
            keep.append(whl)
    return keep, have


def install(wheels: str, site: str) -> int:
    keep, have = pick_wheels(Path(wheels))
    if have:
        print(f"kept what the machine has: {', '.join(have)}")
    if not keep:
        print(f"nothing to install from {wheels}")
        return 0
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--no-index",
           "--disable-pip-version-check", "--target", site, *map(str, keep)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(
            f"gpu_check: pip could not install the wheels into {site}: {done.stderr.strip()[-400:]}"
        )
        return 1
    print(f"installed {len(keep)} wheels into {site}: {', '.join(_dist(w)[0] for w in keep)}")
    return 0


def versions() -> int:
    site = str(Path(__file__).resolve().parents[1] / ".gpu-site")
    cells = []
    for name in PACKAGES:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            cells.append(f"{name} -")
            continue
        where = " (.gpu-site)" if str(dist.locate_file("")).startswith(site) else ""
        cells.append(f"{name} {dist.version}{where}")
    print("Versions: " + ", ".join(cells))
    return 0


SMOKE_DOCS = (1024, 640, 384)  # three documents, the first longer than the 512-token window


def smoke() -> int:
    """Two 1B layers (head_dim 256, one sliding, one global), bf16, a packed 2K row: FlexAttention
    forward + backward against SDPA. The first flex step compiles its kernels (timed apart)."""
    import copy
    import time

    import torch

    from gemma3_tune.model.config import GLOBAL, SLIDING, preset
    from gemma3_tune.model.gemma3 import Gemma3
    from gemma3_tune.model.init import random_init

    cfg = preset("1b").replace(num_hidden_layers=2, layer_types=[SLIDING, GLOBAL])
    ids = torch.randint(10, 200000, (1, sum(SMOKE_DOCS)), device="cuda")
    pos = torch.cat([torch.arange(n) for n in SMOKE_DOCS])[None].cuda()
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

    first, _, _ = step(flex)
    again, loss, got = step(flex)
    _, ref_loss, want = step(sdpa)
    gmax = max(g.abs().max().item() for g in want.values())
    diff = max((got[n] - want[n]).abs().max().item() for n in want) / gmax
    finite = all(torch.isfinite(g).all().item() for g in got.values())
    ok = finite and abs(loss - ref_loss) <= 1e-2 * max(1.0, abs(ref_loss)) and diff <= 5e-2
    print(
        f"smoke: flex fwd+bwd {first:.1f} s first (compile), {again * 1000:.0f} ms after; loss"
        f" {loss:.4f} (sdpa {ref_loss:.4f}); max |grad flex - sdpa| / max |grad| {diff:.1e}"
        f"{'' if finite else ', NON-FINITE grads'}:"
        f" {'matches SDPA' if ok else 'DIFFERS from SDPA'} (bf16 tolerance 5e-2)"
    )
    return 0 if ok else 1


def save_cache(folder: str, out: str) -> int:
    """Inductor's and Triton's caches as one archive a device call can bring back."""
    src = Path(folder)
    parts = [p for p in ("inductor", "triton") if (src / p).is_dir()]
    if not parts:
        print(f"no compile cache under {folder}")
        return 0
    with tarfile.open(out, "w:gz") as tar:
        for p in parts:
            tar.add(src / p, arcname=p)
    size = Path(out).stat().st_size
    if size > RETURN_LIMIT:
        Path(out).unlink()
        print(
            f"compile cache not saved: {size / 2**20:.1f} MiB, over the {RETURN_LIMIT >> 20} MiB a device call returns"
        )
        return 0
    print(
        f"compile cache: {out} ({size / 2**20:.1f} MiB); put it at .gpu-cache/compile-cache.tgz for the next call"
    )
    return 0


def main(argv: list[str]) -> int:
    commands = {"machine": machine, "install": install, "versions": versions, "smoke": smoke,
                "save-cache": save_cache}  # fmt: skip
    if not argv or argv[0] not in commands:
        print(f"usage: gpu_check.py {{{'|'.join(commands)}}} [ARGS]", file=sys.stderr)
        return 2
    return commands[argv[0]](*argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
