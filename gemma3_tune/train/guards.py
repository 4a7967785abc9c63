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
    """`read_every`: optimizer steps between host reads of the verdicts. With a fused optimizer
    (torch's fused Adam/AdamW: the Trainer's default `adamw_torch_fused`) a bad step is skipped
    on the device, through the `found_inf` input the fused kernels take for AMP's GradScaler, so
    no step waits for the GPU; the counts are read (a sync) every `read_every` steps, when the
    Trainer logs anyway. Other optimizers need the verdict on the host before they step, so the
    guard reads it every step and drops the gradients of a bad one."""

    def __init__(self, limit: int, dtype_hint: str = "", read_every: int = 1):
        self.limit = limit
        self.dtype_hint = dtype_hint
        self.read_every = read_every
        self.skipped = 0  # steps skipped in the whole run (as of the last read)
        self.in_a_row = 0
        self.steps = 0  # optimizer steps attempted (applied + skipped)
        self.loss_ok: torch.Tensor | None = None  # all losses since the last step finite
        self._total: torch.Tensor | None = None  # on the device: skipped steps, and in a row
        self._run: torch.Tensor | None = None
        self._installed: set[int] = set()

    def saw_loss(self, loss: torch.Tensor) -> None:
        """Called for each micro-batch; kept as a tensor so that no step waits on the device."""
        ok = torch.isfinite(loss.detach()).all()
        self.loss_ok = ok if self.loss_ok is None else self.loss_ok & ok

    def install(self, optimizer: torch.optim.Optimizer) -> None:
        if id(optimizer) not in self._installed:
            optimizer.register_step_pre_hook(self._pre_step)
            optimizer.register_step_post_hook(self._post_step)
            self._installed.add(id(optimizer))

    def _verdict(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """1.0 on the device when this step's gradients or losses are not finite on any rank."""
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
        return bad

    def _pre_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self.steps += 1
        bad = self._verdict(optimizer)
        if self._total is None or self._total.device != bad.device:
            self._total, self._run = torch.zeros_like(bad), torch.zeros_like(bad)
        self._total += bad
        self._run = (self._run + bad) * bad  # steps skipped in a row, 0 after a good one
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = bad  # the fused kernel leaves weights and state as they were
            if self.steps % self.read_every == 0:
                self._read()
            return
        if self._read():  # the host must know now: an optimizer skips params without a gradient
            for g in optimizer.param_groups:
                for p in g["params"]:
                    p.grad = None

    def _post_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        optimizer.__dict__.pop("found_inf", None)

    def _read(self) -> bool:
        """Bring the device counts to the host (a sync): warn about the steps skipped since the
        last read, stop the run after `limit` in a row. True when the latest step was skipped."""
        total, run = int(self._total.item()), int(self._run.item())
        new, self.skipped, self.in_a_row = total - self.skipped, total, run
        if new == 1 and run:
            print(
                f"warning: step {self.steps}: loss or gradient is not finite; step skipped"
                f" ({run} in a row)",
                file=sys.stderr,
            )
        elif new:
            print(
                f"warning: {new} of the steps up to {self.steps} skipped (loss or gradient not"
                f" finite; {run} in a row at step {self.steps})",
                file=sys.stderr,
            )
        if run >= self.limit:
            fix = "lower training.lr (or raise training.warmup_steps)"
            if self.dtype_hint == "float16":
                fix += ", and use model.dtype: bfloat16 (Gemma 3 overflows in float16)"
            raise UserError(
                f"step {self.steps}: loss or gradients not finite for {run} steps in a"
                f" row (training.max_skipped_steps={self.limit}); {fix}, or check the data and"
                " the model weights for NaN"
            )
        return run > 0
