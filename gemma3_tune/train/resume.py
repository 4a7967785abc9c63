"""Resuming a run (`training.resume: true`): the newest complete checkpoint, the checks that
it can continue this recipe's data order and schedule, and DeepSpeed's universal format when
the number of processes changed.

The token count in metrics.jsonl goes on from the checkpoint's (trainer_state.json's
`num_input_tokens_seen`); another length rebuilds the lr schedule for the new total
(schedule.py); a checkpoint that already completes the run is refused with the key to raise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import UserError
from ..outputs import write_atomic
from .checkpoints import newest_complete, remove_incomplete, verify_pickles, written_by
from .distributed import is_main_process, world_size, zero_to_universal
from .recipe import Recipe


def resume_state(recipe: Recipe, out: Path) -> tuple[Path | None, bool]:
    """(the checkpoint to resume from or None, whether to load it through DeepSpeed's
    universal format). A ZeRO checkpoint is partitioned by world size: on another one it is
    converted once, by global rank 0."""
    resume = find_resume(recipe, out)
    if resume is None:
        return None, False
    wrote, batch = written_by(resume)
    check_global_batch(recipe, resume, batch)
    verify_pickles(resume)  # before the Trainer or DeepSpeed unpickles anything in it
    universal = recipe.deepspeed is not None and wrote is not None and wrote != world_size()
    if universal:
        zero_to_universal(resume, wrote, world_size())
    return resume, universal


def find_resume(recipe: Recipe, out: Path) -> Path | None:
    if not recipe.training.resume:
        return None
    resume = resume_point(out) if is_main_process() else newest_complete(out)
    if resume is None:
        print(f"no complete checkpoint in {out}; starting from scratch", file=sys.stderr)
    else:
        print(f"resuming from {resume.name}", file=sys.stderr)
    return resume


def resume_point(out: Path) -> Path | None:
    """The newest complete checkpoint; half-written ones are removed, and the run's logs
    (metrics.jsonl, and GRPO's completions.jsonl) lose the rows logged after the checkpoint
    (the resumed run logs those steps again)."""
    for p in remove_incomplete(out):
        print(f"removed {p.name}: it was not completely written", file=sys.stderr)
    ckpt = newest_complete(out)
    step = int(ckpt.name.removeprefix("checkpoint-")) if ckpt else 0
    for name in ("metrics.jsonl", "completions.jsonl"):
        log = out / name
        if log.is_file():
            rows = [r for r in log.read_text().splitlines() if json.loads(r)["step"] <= step]
            write_atomic(log, "".join(r + "\n" for r in rows))
    return ckpt


def check_global_batch(recipe: Recipe, ckpt: Path, batch: int | None) -> None:
    """Resuming continues the data order at step x global batch: on another number of
    processes that holds only if micro_batch_size x grad_accum x processes is unchanged."""
    t = recipe.training
    now = t.micro_batch_size * t.grad_accum * world_size()
    if batch is None or batch == now:
        return
    per = t.micro_batch_size * world_size()
    fix = (
        f"set training.grad_accum={batch // per}"
        if batch % per == 0
        else "choose micro_batch_size and grad_accum whose product with the processes matches"
    )
    raise UserError(
        f"training.resume: {ckpt.name} was trained with a global batch of {batch} rows"
        f" (micro_batch_size x grad_accum x processes), this run has {now}; {fix} to continue"
        " the same data order"
    )


def refuse_finished(trainer, ckpt: Path) -> None:
    """Resuming at or past this run's last step would train one more step (HF's loop checks
    the step count only after a step) at the schedule's end lr, 0: say so instead."""
    done = int(ckpt.name.removeprefix("checkpoint-"))
    total, by_epochs = trainer.args.max_steps, trainer.args.max_steps <= 0
    if by_epochs:  # the Trainer's own count for these epochs, this data and batch
        loader = trainer.get_train_dataloader()
        total = trainer.set_initial_training_values(trainer.args, loader)[-1]
    if done >= total:
        epochs = " (or raise training.epochs)" if by_epochs else ""
        raise UserError(
            f"training.resume: {ckpt.name} already completes this run ({done} of {total} steps);"
            f" set training.max_steps above {done}{epochs} to train more (the lr schedule is"
            " rebuilt for the new length)"
        )
