"""The HF TrainingArguments of a run (TRL's SFTConfig), from the recipe: what the Trainer's
own machinery (schedule, accumulation, checkpoints, DeepSpeed, trackers) is told, and what
is switched off because we do it ourselves (activation checkpointing, dataset preparation,
progress bars)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..model.dtypes import resolve_dtype
from . import precision, refusals, trackers
from .recipe import Recipe


def deepspeed_config(recipe: Recipe, load_universal: bool = False) -> str | dict | None:
    ds = recipe.deepspeed
    if ds is None:
        return None
    path = str(refusals.deepspeed_config_path(recipe))
    if not load_universal:
        return path
    cfg = json.loads(Path(path).read_text())
    cfg.setdefault("checkpoint", {})["load_universal"] = True
    return cfg


def checkpointing_off(config_cls: type) -> dict[str, bool]:
    """The argument that turns the Trainer's own activation checkpointing off, by its name in
    the installed transformers: `activation_checkpointing` from 5.2x, `gradient_checkpointing`
    before (5.17 has no `activation_checkpointing` and refuses it). TRL's SFTConfig defaults
    it to on, which would checkpoint every layer again under our own (~30% slower)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    key = (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )
    return {key: False}


def build_args(recipe: Recipe, out: Path, has_eval: bool, load_universal: bool = False):
    from trl import SFTConfig

    t = recipe.training
    report_to = trackers.report_to(recipe, out)
    return SFTConfig(
        output_dir=str(out),
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        save_steps=t.save_steps,
        save_total_limit=None,  # CompleteCheckpoints rotates, after the marker is written
        eval_strategy="steps" if (has_eval and t.eval_steps) else "no",
        eval_steps=t.eval_steps,
        logging_steps=t.logging_steps,
        seed=t.seed,
        data_seed=t.seed,
        # precision.py: fp32 masters for what trains, compute in model.dtype (autocast, or
        # DeepSpeed's own bf16 mode).
        **precision.mixed_precision_flags(resolve_dtype(recipe.model.dtype)),
        **checkpointing_off(SFTConfig),  # our model checkpoints its own layers (see below)
        report_to=report_to,
        run_name=out.name,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        packing=False,
        dataloader_num_workers=0,
        deepspeed=deepspeed_config(recipe, load_universal),
        save_only_model=False,
        disable_tqdm=True,  # console.Console draws the one progress bar
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        ddp_timeout=t.ddp_timeout,
        logging_first_step=True,
    )


def compile_enabled(recipe: Recipe, zero3: bool) -> bool:
    """training.compile: auto is on with CUDA (see BENCHMARKS.md for CPU, where it does not
    pay); never under ZeRO-3, whose parameter-gathering hooks torch.compile cannot trace."""
    want = recipe.training.compile  # true with ZeRO-3 is refused (refusals.py)
    if want == "auto":  # nor with context parallelism (its exchanges are not traced yet)
        return torch.cuda.is_available() and not zero3 and recipe.training.context_parallel == 1
    return bool(want)
