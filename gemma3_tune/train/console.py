"""What `train` prints: one progress bar and one compact line per logging step.

Replaces HF's ProgressCallback/PrinterCallback, which print each log as a Python dict of
quoted strings between tqdm redraws. On a terminal the bar (step, ETA, loss, lr, tokens/s)
stays at the bottom and the lines scroll above it; in a log file (no TTY) only the lines are
written. The full record of every step is metrics.jsonl.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..progress import on_terminal


def train_line(step: int, max_steps: int, logs: dict) -> str:
    """`step  12/300  loss 1.2345  lr 2.00e-04  grad 0.87  3,210 tok/s  0.41 s/step  1.2 GB`"""
    width = len(str(max_steps))
    parts = [f"step {step:>{width}}/{max_steps}", f"loss {logs['loss']:.4f}"]
    if logs.get("kd_loss") is not None:  # distillation: its two terms
        parts.append(f"(kd {logs['kd_loss']:.4f}, ce {logs['ce_loss']:.4f})")
    if logs.get("rewards/accuracies") is not None:  # DPO/ORPO
        parts.append(
            f"(acc {logs['rewards/accuracies']:.2f}, reward margin {logs['rewards/margins']:.3f})"
        )
    if logs.get("lr") is not None:
        parts.append(f"lr {logs['lr']:.2e}")
    if logs.get("grad_norm") is not None:
        parts.append(f"grad {logs['grad_norm']:.2f}")
    if logs.get("tokens_per_second") is not None:
        parts.append(f"{logs['tokens_per_second']:,.0f} tok/s")
    if logs.get("step_seconds") is not None:
        parts.append(f"{logs['step_seconds']:.2f} s/step")
    if logs.get("peak_memory_gb"):
        parts.append(f"{logs['peak_memory_gb']:.1f} GB")
    if logs.get("skipped_steps"):
        parts.append(f"skipped {logs['skipped_steps']}")
    return "  ".join(parts)


def eval_line(step: int, max_steps: int, logs: dict) -> str:
    width = len(str(max_steps))
    line = f"eval {step:>{width}}/{max_steps}  loss {logs['eval_loss']:.4f}"
    if "eval_perplexity" in logs:
        return line + f"  perplexity {logs['eval_perplexity']:.2f}"
    if "eval_reward" in logs:  # GRPO: the held-out prompts' sampled completions
        return line + f"  reward {logs['eval_reward']:.3f} (sampled)"
    if "eval_rewards/accuracies" in logs:  # DPO / ORPO
        return (
            line + f"  reward accuracy {logs['eval_rewards/accuracies']:.2f}"
            f"  reward margin {logs['eval_rewards/margins']:.3f} (beta-scaled log-ratio)"
        )
    return line


class Console(TrainerCallback):
    """The progress bar and the lines (rank 0 only)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.bar: tqdm | None = None
        self.eval_bar: tqdm | None = None

    def _tty(self) -> bool:
        return on_terminal(self.stream)

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero and self._tty():
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=self.stream,
            )

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kw):
        if self.bar is None or eval_dataloader is None or not hasattr(eval_dataloader, "__len__"):
            return
        if self.eval_bar is None:
            self.eval_bar = tqdm(
                total=len(eval_dataloader),
                desc="eval",
                leave=False,
                dynamic_ncols=True,
                file=self.stream,
            )
        self.eval_bar.update(1)

    def on_evaluate(self, args, state, control, **kw):
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            self._write(train_line(state.global_step, state.max_steps, logs))
            if self.bar is not None:
                rate = logs.get("tokens_per_second")
                self.bar.set_postfix_str(
                    f"loss {logs['loss']:.4f}, lr {logs.get('lr') or 0:.2e}"
                    + (f", {rate:,.0f} tok/s" if rate is not None else ""),
                    refresh=True,
                )
        elif "eval_loss" in logs:
            self._write(eval_line(state.global_step, state.max_steps, logs))
        elif "train_runtime" in logs:
            self._write(
                f"done {state.global_step} steps in {logs['train_runtime']:.1f} s,"
                f" mean loss {logs.get('train_loss', float('nan')):.4f}"
            )

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
