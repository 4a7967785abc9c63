"""The learning-rate schedule: linear warmup that starts at lr / warmup_steps, then decay.

HF's schedulers warm up from 0, so the first optimizer step runs at lr 0 and is wasted (with
`warmup_steps: 1`, the only warmup step learns nothing). Here step s (0-based) of the warmup
runs at (s + 1) / warmup_steps of the peak; after it, `cosine` and `linear` decay to 0 at the
last step exactly as HF's do, and `constant` holds the peak (HF's `constant` would ignore
warmup_steps altogether).

Resuming with another length (`training.max_steps`, or epochs over other data) rebuilds the
schedule for the new total: resumed step s gets `lr_factor(s, warmup, new_total)`, the lr a run
started with the new length has at that step (so warmup stays done, and the decay reaches 0 at
the new last step). The checkpoint's scheduler state only restores the step count: the factor's
arguments live in the partial, which LambdaLR does not save (its `__dict__` is empty).
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
    # a partial (not a lambda): picklable; LambdaLR saves only its (empty) __dict__, so on
    # resume the factor keeps this run's warmup and total
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup=warmup, total=total, kind=kind)
    )


def restart_at_current_step(sched: torch.optim.lr_scheduler.LambdaLR) -> None:
    """After a resume: give the optimizer this run's lr for the step it resumes at.

    The checkpoint's optimizer state carries the lr the *old* schedule set for the next step
    (0.0 when the old run ended; the new schedule would only take over one step later). Moving
    the step count back one and stepping recomputes it from this run's factor, for the
    optimizer's param groups and for `get_last_lr()` (what the Trainer logs) alike."""
    sched.last_epoch -= 1
    sched.step()
