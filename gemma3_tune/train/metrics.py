"""metrics.jsonl, the run's record of every logged step and evaluation, and loss.png drawn
from it. The model card (model_card.py) reads it back too."""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import TrainerCallback


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, oldest first ([] before the first row is written)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsCallback(TrainerCallback):
    """Appends every train and eval log to metrics.jsonl and redraws loss.png at each save."""

    TRAIN_KEYS = (
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "tokens_per_second",
        "step_seconds",
        "peak_memory_gb",
        "skipped_steps",
    )

    def __init__(self, out: Path, prefixes: tuple[str, ...] = ()):
        """`prefixes`: the keys the run's objective logs (its `log_prefixes`), kept after the
        common ones; eval rows carry them with an eval_ prefix."""
        self.out = out
        self.path = out / "metrics.jsonl"
        self.prefixes = prefixes

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            row = {"step": state.global_step, **{k: logs.get(k) for k in self.TRAIN_KEYS}}
            row.update({k: v for k, v in logs.items() if k.startswith(self.prefixes)})
        elif "eval_loss" in logs:
            row = {"step": state.global_step, "eval_loss": logs["eval_loss"]}
            if "eval_perplexity" in logs:
                row["eval_perplexity"] = logs["eval_perplexity"]
            eval_keys = tuple("eval_" + p for p in self.prefixes)
            row.update({k: v for k, v in logs.items() if k.startswith(eval_keys)})
        else:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            plot_losses(self.path, self.out / "loss.png")

    def on_train_end(self, args, state, control, **kw):
        if state.is_world_process_zero:
            plot_losses(self.path, self.out / "loss.png")


def plot_losses(metrics: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train, strict=True), label="train")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
