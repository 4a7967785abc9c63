"""What `dtype: auto` means on this machine: bf16 where its matmuls are native, fp32 elsewhere.

CUDA GPUs: bf16. CPUs differ by two orders of magnitude, so `auto` reads the CPU's flags:
- with AVX512-BF16 (AMD Zen 4+, Intel Cooper Lake+) or AMX (Intel Sapphire Rapids+), oneDNN
  runs bf16 matmuls natively: measured on a 2-core AMD EPYC with `avx512_bf16` (no AMX), 2048^3
  in bf16 at 710 GFLOP/s against 178 in fp32;
- without them, bf16 is emulated: 0.9 GFLOP/s against ~50 in fp32 on such a CPU.
Flags are read from /proc/cpuinfo (Linux, x86). Where it cannot be read (macOS, Windows, ARM's
`Features` line), `auto` stays fp32: the safe side of a 100x cliff.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

# /proc/cpuinfo flag -> the name users know it by
NATIVE_BF16_FLAGS = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX"}
CPUINFO = Path("/proc/cpuinfo")
_announced: set[str] = set()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (`flags` line of /proc/cpuinfo); empty where there is none."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def native_bf16_cpu() -> str | None:
    """The feature that makes this CPU's bf16 matmuls fast ("AVX512-BF16", "AMX"), or None."""
    flags = cpu_flags()
    return next((name for flag, name in NATIVE_BF16_FLAGS.items() if flag in flags), None)


def auto_dtype() -> tuple[torch.dtype, str]:
    """(the dtype `auto` resolves to, why): bf16 on CUDA and on native-bf16 CPUs, else fp32."""
    if torch.cuda.is_available():
        return torch.bfloat16, "CUDA"
    feature = native_bf16_cpu()
    if feature:
        return torch.bfloat16, f"CPU has {feature}"
    return torch.float32, "CPU has no AVX512-BF16 or AMX: bf16 matmuls would be ~100x slower"


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the recipe's spelling)."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` | `bfloat16` | `float32` | `float16` -> a torch dtype."""
    return auto_dtype()[0] if name == "auto" else getattr(torch, name)


def announce_auto() -> None:
    """Print auto's choice and its reason once per process, after the refusals of bad input
    (those stay one line): `dtype auto -> bfloat16 (CPU has AVX512-BF16)`."""
    dtype, why = auto_dtype()
    line = f"dtype auto -> {dtype_name(dtype)} ({why})"
    if line not in _announced:
        _announced.add(line)
        print(line, file=sys.stderr)
