"""The learning-rate schedule: linear warmup that starts at lr / warmup_steps, then decay.

HF's schedulers warm up from 0, so the first optimizer step runs at lr 0 and is wasted (with
`warmup_steps: 1`, the only warmup step learns nothing). Here step s (0-based) of the warmup
runs at (s + 1) / warmup_steps of the peak; after it, `cosine` and `linear` decay to 0 at the
last step exactly as HF's do, and `constant` holds the peak (HF's `constant` would ignore
warmup_steps altogether).
"""

from __future__ import annotations

import math
from functools import partial

import torch


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """The multiplier of the peak lr for optimizer step `step` (0-based) of `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine


def scheduler(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, kind: str
) -> torch.optim.lr_scheduler.LambdaLR:
    # a partial (not a lambda): LambdaLR saves it in the checkpoint's scheduler state
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup=warmup, total=total, kind=kind)
    )
