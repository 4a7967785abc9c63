"""FlexAttention tile sizes that fit the GPU's shared memory.

Every Gemma 3 size but 27B has head_dim 256. torch's default FlexAttention tiles for that head
dimension are sized for A100/H100 (163 and 227 KB of shared memory per block); on cards with
99 KB per block (RTX 3090/4090, A10, L40S, consumer Blackwell) the Triton kernels do not
compile: "out of resource: shared memory, Required: 140800, Hardware limit: 101376" for the
backward on RTX 3090/4090-class cards (unsloth-zoo#542; 114688 on sm_12x, pytorch#198224), and
likewise for the forward (pytorch#180278). No `kernel_options` means torch's defaults, so we pick tiles ourselves from
`shared_memory_per_block_optin`: keep torch's defaults where they fit, else take the largest
tiles that do, else tell the caller to use SDPA.

How torch uses the options (torch 2.11-2.13, `torch/_inductor/kernel/flex/flex_attention.py`):
keys prefixed `fwd_` reach only the forward kernel and `bwd_` only the backward one (the
prefix is stripped, the other pass's keys dropped). The forward reads BLOCK_M (queries per
program), BLOCK_N (keys per inner step), num_stages, num_warps; the backward reads BLOCK_M1 and
BLOCK_N1 (the dK/dV programs: BLOCK_N1 keys held, BLOCK_M1 queries streamed) and BLOCK_M2 and
BLOCK_N2 (the dQ programs: BLOCK_M2 queries held, BLOCK_N2 keys streamed), num_stages,
num_warps. The kernels assert BLOCK_N1 % BLOCK_M1 == 0 and BLOCK_M2 % BLOCK_N2 == 0, and the
BlockMask's block size (128) must be a multiple of every block. Head dims are rounded up to a
power of two inside the kernels, so 160..256 all cost what 256 does.

The estimates below model the mma.sync kernels Triton emits for sm_80-sm_89 and sm_12x, the
cards that are short of shared memory; on sm_90/sm_100 they only confirm that torch's defaults
fit. They are checked against every figure published for these kernels (tests/test_flex_kernels.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final, Literal

import torch

USE_SDPA: Final = "sdpa"  # returned instead of options when no tile fits: run SDPA instead
KernelOptions = dict[str, int]
_SPARSE_BLOCK = 128  # the BlockMask block size (create_block_mask's default, ours)


@dataclass(frozen=True)
class FwdTiles:
    block_m: int  # queries per program, held for the whole row of keys
    block_n: int  # keys (and values) per inner-loop step, streamed
    num_stages: int  # software-pipelining depth of the streamed K/V loads
    num_warps: int

    def options(self) -> KernelOptions:
        return {
            "fwd_BLOCK_M": self.block_m,
            "fwd_BLOCK_N": self.block_n,
            "fwd_num_stages": self.num_stages,
            "fwd_num_warps": self.num_warps,
        }

    def __str__(self) -> str:
        return (
            f"BLOCK_M={self.block_m} BLOCK_N={self.block_n}"
            f" num_stages={self.num_stages} num_warps={self.num_warps}"
        )


@dataclass(frozen=True)
class BwdTiles:
    block_m1: int  # dK/dV programs: queries per streamed step
    block_n1: int  # dK/dV programs: keys held
    block_m2: int  # dQ programs: queries held
    block_n2: int  # dQ programs: keys per streamed step
    num_stages: int
    num_warps: int

    def options(self) -> KernelOptions:
        return {
            "bwd_BLOCK_M1": self.block_m1,
            "bwd_BLOCK_N1": self.block_n1,
            "bwd_BLOCK_M2": self.block_m2,
            "bwd_BLOCK_N2": self.block_n2,
            "bwd_num_stages": self.num_stages,
            "bwd_num_warps": self.num_warps,
        }

    def __str__(self) -> str:
        return (
            f"BLOCK_M1={self.block_m1} BLOCK_N1={self.block_n1} BLOCK_M2={self.block_m2}"
            f" BLOCK_N2={self.block_n2} num_stages={self.num_stages} num_warps={self.num_warps}"
        )


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _buffers(num_stages: int) -> int:
    # Triton's pipeliner keeps num_stages - 1 copies of each streamed tile in flight; an
    # unpipelined loop (num_stages 1) still stages its dot operands once.
    return max(num_stages - 1, 1)


def fwd_shared_memory(
    t: FwdTiles, head_dim: int, dtype_bytes: int = 2, v_head_dim: int | None = None
) -> int:
    """Estimated shared memory (bytes) of the forward kernel, with Dq, Dv = the query/key and
    value head dims rounded up to powers of two, b = dtype_bytes, S = num_stages:

        b * M * Dq                           the query tile, held
      + b * N * (Dq + Dv) * max(S - 1, 1)    key and value tiles, S - 1 deep
      + b * M * N                            scores cast to the input dtype for `p @ v`
      + 8 * M                                row max and row sum (fp32) changing layout

    It reproduces the one published forward figure exactly: M=64, N=64, S=3 with qk 192
    (-> 256) and v 128 needs 139,776 bytes on sm_86 (pytorch#180278). At head_dim 256, bf16:
    torch's sm_8x default (32, 64, 3 stages) -> 151,808; (32, 64, 2 stages), torch's own pick
    for sm_12x boards with the same 99 KB, -> 86,272.
    """
    d_qk = _pow2(head_dim)
    d_v = _pow2(v_head_dim or head_dim)
    m, n, b = t.block_m, t.block_n, dtype_bytes
    return b * (m * d_qk + _buffers(t.num_stages) * n * (d_qk + d_v) + m * n) + 8 * m


def bwd_shared_memory(
    t: BwdTiles, head_dim: int, dtype_bytes: int = 2, v_head_dim: int | None = None
) -> int:
    """Estimated shared memory (bytes) of the backward kernel: one kernel runs both kinds of
    program, so it needs the larger of (Dq, Dv, b as above, B = max(num_stages - 1, 1))

        dK/dV:  b * N1 * (Dq + Dv)  +  b * M1 * (Dq + Dv) * B  +  2 * b * N1 * M1  +  8 * M1 * B
                (k, v held; q, dO streamed; p^T and dS^T cast for their dots; lse, delta)
        dQ:     b * M2 * (Dq + Dv)  +  b * N2 * (Dq + Dv) * B  +  b * M2 * N2      +  8 * M2
                (q, dO held; k, v streamed; dS cast; lse, delta)

    Every tile a program touches is counted as resident at once, so this errs high (Triton
    frees or reuses some buffers): torch's default (64, 64, 64, 64) at head_dim 256, bf16,
    gives 147,968 here against the 140,800 Triton reports with 2 stages on RTX 3090/4090-class
    cards (unsloth-zoo#542) and 114,688 with 1 stage on sm_12x (pytorch#198224), both over the
    101,376 those cards have. (32, 32, 32, 32) with 2 stages gives 69,888; it compiles and
    matches a float64 reference on a 99 KB sm_12.1 board (pytorch#198228).
    """
    d = _pow2(head_dim) + _pow2(v_head_dim or head_dim)  # a row of q and dO, or of k and v
    b, bufs = dtype_bytes, _buffers(t.num_stages)
    m1, n1, m2, n2 = t.block_m1, t.block_n1, t.block_m2, t.block_n2
    dkdv = b * (n1 * d + bufs * m1 * d + 2 * n1 * m1) + 8 * m1 * bufs
    dq = b * (m2 * d + bufs * n2 * d + m2 * n2) + 8 * m2
    return max(dkdv, dq)


# torch's CUDA defaults outside max-autotune, as in torch 2.11-2.13
# (torch/_inductor/template_heuristics/triton.py, CUDAConfigHeuristic): (M, N, stages, warps)
# by (dtype is fp32, head_dim); any other head_dim <= 256 gets (64, 64, 3, 4).
_FWD_DEFAULTS: dict[str, dict[tuple[bool, int], tuple[int, int, int, int]]] = {
    "sm_120": {
        (True, 64): (128, 32, 2, 4), (True, 128): (128, 32, 2, 4), (True, 256): (64, 16, 2, 4),
        (False, 64): (128, 64, 2, 4), (False, 128): (128, 64, 2, 8), (False, 256): (32, 64, 2, 4),
    },
    "sm_100": {
        (True, 64): (128, 32, 3, 4), (True, 128): (32, 64, 3, 4), (True, 192): (32, 64, 2, 4),
        (True, 256): (32, 32, 3, 4), (False, 64): (128, 128, 3, 4), (False, 128): (128, 64, 3, 8),
        (False, 192): (128, 128, 1, 8), (False, 256): (64, 32, 3, 4),
    },
    "h100": {
        (True, 64): (128, 32, 3, 4), (True, 128): (32, 64, 3, 4), (True, 192): (32, 64, 1, 8),
        (True, 256): (32, 32, 3, 4), (False, 64): (128, 128, 3, 4), (False, 128): (128, 64, 3, 8),
        (False, 256): (64, 32, 3, 4),
    },
    "a100": {
        (True, 64): (128, 32, 3, 4), (True, 128): (128, 32, 3, 4), (True, 256): (64, 16, 3, 4),
        (False, 64): (128, 64, 3, 4), (False, 128): (128, 64, 3, 8), (False, 192): (128, 32, 2, 8),
        (False, 256): (32, 64, 3, 4),
    },
}  # fmt: skip


def torch_default_tiles(
    head_dim: int, capability: tuple[int, int], dtype_bytes: int = 2
) -> tuple[FwdTiles, BwdTiles]:
    """The tiles torch picks when given no kernel_options (see _FWD_DEFAULTS)."""
    fp32 = dtype_bytes == 4
    major, minor = capability
    if head_dim > 256:
        fwd = (32, 16, 3, 4) if fp32 else (64, 32, 3, 4)
    else:
        table = (
            "sm_120" if capability >= (11, 0)
            else "sm_100" if capability >= (10, 0)
            else "h100" if capability == (9, 0)
            else "a100" if capability >= (8, 0)
            else None
        )  # fmt: skip
        fwd = _FWD_DEFAULTS[table].get((fp32, head_dim)) if table else None
        fwd = fwd or (64, 64, 3, 4)
    h = head_dim
    if fp32 or head_dim > 256 or major < 8:
        bwd = (16, 16, 16, 16, 1, 4)
    elif major in (11, 12):
        bwd = (32, 128, 128, 32, 3, 4) if h < 64 else (64, 64, 64, 64, 1 if h >= 128 else 2, 4)
    elif major >= 10:
        bwd = (64, 128, 128, 64, 3, 4) if h <= 128 else (64, 64, 64, 64, 1, 8 if h <= 192 else 4)
    elif capability == (9, 0):
        bwd = (
            (64, 64, 64, 64, 3, 4) if h < 64
            else (64, 128, 128, 64, 3, 8) if h <= 128
            else (64, 64, 64, 64, 2, 4)
        )  # fmt: skip
    elif h < 64:
        bwd = (32, 128, 128, 32, 3, 4)
    else:
        bwd = (64, 64, 64, 64, 3 if minor == 6 and h == 128 else 2, 4)
    return FwdTiles(*fwd), BwdTiles(*bwd)


# Largest first; the first that fits is taken. (32, 64, 2 stages) forward and (32, 32, 32, 32,
# 2 stages) backward are the ones measured to work on a 99 KB board (see the estimates above).
_FWD_CANDIDATES: Final = tuple(
    FwdTiles(*t)
    for t in [
        (128, 64, 3, 8), (64, 64, 3, 4), (64, 64, 2, 4), (32, 64, 3, 4), (64, 32, 3, 4),
        (32, 64, 2, 4), (64, 32, 2, 4), (32, 32, 2, 4), (32, 32, 1, 4), (16, 32, 1, 4),
        (16, 16, 1, 4),
    ]
)  # fmt: skip
_BWD_CANDIDATES: Final = tuple(
    BwdTiles(*t)
    for t in [
        (64, 64, 64, 64, 3, 4), (64, 64, 64, 64, 2, 4), (32, 64, 64, 32, 3, 4),
        (32, 64, 64, 32, 2, 4), (32, 32, 32, 32, 3, 4), (32, 32, 32, 32, 2, 4),
        (16, 32, 32, 16, 2, 4), (16, 16, 16, 16, 1, 4),
    ]
)  # fmt: skip


@dataclass(frozen=True)
class FlexPlan:
    """What to pass to flex_attention for one head_dim on one device, and why."""

    head_dim: int
    budget: int  # shared_memory_per_block_optin, bytes
    capability: tuple[int, int]
    dtype_bytes: int
    default_fwd: FwdTiles  # what torch would run without kernel_options
    default_bwd: BwdTiles
    fwd: FwdTiles | None  # our tiles; None: keep torch's (it fits) or nothing fits
    bwd: BwdTiles | None

    def fwd_need(self, t: FwdTiles) -> int:
        return fwd_shared_memory(t, self.head_dim, self.dtype_bytes)

    def bwd_need(self, t: BwdTiles) -> int:
        return bwd_shared_memory(t, self.head_dim, self.dtype_bytes)

    @property
    def fwd_fits(self) -> bool:
        return self.fwd is not None or self.fwd_need(self.default_fwd) <= self.budget

    @property
    def bwd_fits(self) -> bool:
        return self.bwd is not None or self.bwd_need(self.default_bwd) <= self.budget

    @property
    def use_sdpa(self) -> bool:
        return not (self.fwd_fits and self.bwd_fits)

    @property
    def options(self) -> KernelOptions | None | Literal["sdpa"]:
        if self.use_sdpa:
            return USE_SDPA
        opts = {
            **(self.fwd.options() if self.fwd else {}),
            **(self.bwd.options() if self.bwd else {}),
        }
        return opts or None

    def describe(self, device_name: str) -> str:
        """One log line: the device, its budget, and the tiles (or SDPA) chosen."""
        major, minor = self.capability
        head = (
            f"flex kernels: head_dim {self.head_dim} on {device_name}"
            f" (sm_{major}{minor}, {_kb(self.budget)} shared memory per block): "
        )
        if self.use_sdpa:
            short = [
                f"the smallest {name} tiles need {_kb(need)}"
                for name, fits, need in [
                    ("forward", self.fwd_fits, self.fwd_need(_FWD_CANDIDATES[-1])),
                    ("backward", self.bwd_fits, self.bwd_need(_BWD_CANDIDATES[-1])),
                ]
                if not fits
            ]
            return head + f"{' and '.join(short)}: attention uses SDPA with expanded K/V"

        def part(name: str, chosen, default, need) -> str:
            if chosen is None:
                return f"{name} torch's default {default} (est. {_kb(need(default))})"
            return (
                f"{name} {chosen} (est. {_kb(need(chosen))}; torch's default {default}"
                f" would need {_kb(need(default))})"
            )

        fwd = part("fwd", self.fwd, self.default_fwd, self.fwd_need)
        bwd = part("bwd", self.bwd, self.default_bwd, self.bwd_need)
        return head + f"{fwd}; {bwd}"


def _kb(n: int) -> str:
    return f"{n // 1024} KB"


def plan_flex_kernels(
    head_dim: int,
    shared_memory_per_block_optin: int,
    capability: tuple[int, int],
    dtype_bytes: int = 2,
) -> FlexPlan:
    """Per pass: torch's default tiles if their estimate fits the budget, else the first
    candidate (largest first) that fits; SDPA when some pass has none."""
    budget = shared_memory_per_block_optin
    default_fwd, default_bwd = torch_default_tiles(head_dim, capability, dtype_bytes)
    fwd = bwd = None
    if fwd_shared_memory(default_fwd, head_dim, dtype_bytes) > budget:
        fits = (t for t in _FWD_CANDIDATES if fwd_shared_memory(t, head_dim, dtype_bytes) <= budget)
        fwd = next(fits, None)
    if bwd_shared_memory(default_bwd, head_dim, dtype_bytes) > budget:
        fits = (t for t in _BWD_CANDIDATES if bwd_shared_memory(t, head_dim, dtype_bytes) <= budget)
        bwd = next(fits, None)
    return FlexPlan(head_dim, budget, capability, dtype_bytes, default_fwd, default_bwd, fwd, bwd)


def flex_kernel_options(
    head_dim: int,
    shared_memory_per_block_optin: int,
    capability: tuple[int, int],
    dtype_bytes: int = 2,
) -> KernelOptions | None | Literal["sdpa"]:
    """`kernel_options` for flex_attention: None when torch's defaults fit, USE_SDPA when no
    tile does, else a dict of `fwd_*` / `bwd_*` keys for the pass(es) whose default does not.

    At head_dim 256 in bf16: None on H100 (sm_90, 232,448 B) and A100 (sm_80, 166,912 B); on
    L40S, RTX 4090 (sm_89) and A10 (sm_86), 101,376 B: fwd (32, 64, 2 stages, 4 warps) and
    bwd (32, 32, 32, 32, 2 stages, 4 warps).
    """
    return plan_flex_kernels(
        head_dim, shared_memory_per_block_optin, capability, dtype_bytes
    ).options


def options_for_device(
    device: torch.device | str, head_dim: int, dtype: torch.dtype = torch.bfloat16
) -> tuple[KernelOptions | None | Literal["sdpa"], str]:
    """flex_kernel_options for a CUDA device, and a one-line description for the log.

    Reads torch.cuda.get_device_properties once per (device index, head_dim, dtype). Other
    devices (CPU, ROCm, whose shared memory is sized differently) keep torch's defaults.
    Call it outside compiled code and pass the result as `kernel_options=`.
    """
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip:
        return None, f"flex kernels: head_dim {head_dim} on {device}: torch's defaults"
    index = device.index if device.index is not None else torch.cuda.current_device()
    options, line = _device_plan(index, head_dim, dtype.itemsize)
    return (dict(options) if isinstance(options, dict) else options), line


@functools.cache
def _device_plan(index: int, head_dim: int, dtype_bytes: int):
    props = torch.cuda.get_device_properties(index)
    plan = plan_flex_kernels(
        head_dim, props.shared_memory_per_block_optin, (props.major, props.minor), dtype_bytes
    )
    return plan.options, plan.describe(props.name)
