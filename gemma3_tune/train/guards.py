"""Numerical guard: a step whose loss or gradients are not finite is skipped, not applied.

Installed as an optimizer step pre-hook (a public PyTorch API): when any gradient, or the loss
the Trainer saw since the last step, is NaN or infinite, every gradient is set to None, so the
optimizer leaves the parameters and its own state (moments, step counts) exactly as they were.
The skip is counted; after `limit` skipped steps in a row the run stops with a message that
names the step. Under data or ZeRO parallelism the verdict is all-reduced, so every rank
skips the same steps.
"""

from __future__ import annotations

import sys

import torch

from ..errors import UserError


class NonFiniteGuard:
    def __init__(self, limit: int, dtype_hint: str = ""):
        self.limit = limit
        self.dtype_hint = dtype_hint
        self.skipped = 0  # steps skipped in the whole run
        self.in_a_row = 0
        self.steps = 0  # optimizer steps attempted (applied + skipped)
        self.loss_ok: torch.Tensor | None = None  # all losses since the last step finite
        self._installed: set[int] = set()

    def saw_loss(self, loss: torch.Tensor) -> None:
        """Called for each micro-batch; kept as a tensor so that no step waits on the device."""
        ok = torch.isfinite(loss.detach()).all()
        self.loss_ok = ok if self.loss_ok is None else self.loss_ok & ok

    def install(self, optimizer: torch.optim.Optimizer) -> None:
        if id(optimizer) not in self._installed:
            optimizer.register_step_pre_hook(self._pre_step)
            self._installed.add(id(optimizer))

    def _pre_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self.steps += 1
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        ok = torch.tensor(True, device=device)
        if grads:  # one fused norm over every gradient: NaN or inf anywhere makes it so
            ok = torch.isfinite(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False))
        if self.loss_ok is not None:
            ok = ok & self.loss_ok.to(device)
        self.loss_ok = None
        bad = (~ok).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if not bad.item():
            self.in_a_row = 0
            return
        for g in optimizer.param_groups:
            for p in g["params"]:
                p.grad = None  # optimizers skip parameters without a gradient
        self.skipped += 1
        self.in_a_row += 1
        print(
            f"warning: step {self.steps}: loss or gradient is not finite; step skipped"
            f" ({self.in_a_row} in a row)",
            file=sys.stderr,
        )
        if self.in_a_row >= self.limit:
            fix = "lower training.lr (or raise training.warmup_steps)"
            if self.dtype_hint == "float16":
                fix += ", and use model.dtype: bfloat16 (Gemma 3 overflows in float16)"
            raise UserError(
                f"step {self.steps}: loss or gradients not finite for {self.in_a_row} steps in a"
                f" row (training.max_skipped_steps={self.limit}); {fix}, or check the data and"
                " the model weights for NaN"
            )
