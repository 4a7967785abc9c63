"""`gemma3-tune train`: one recipe -> one run directory, as a list of steps.

The loop is TRL's `SFTTrainer` (HF Trainer underneath: checkpoints, resume, schedulers,
gradient accumulation, DeepSpeed, wandb), with our loop class (loop.py). We hand it our own
pre-packed rows and collator (batches.py); the objective (objectives/) computes the loss. The
steps: refusals.py, the objective's data (and what it prepares before the model loads),
resume.py, args.py, build_model.py, batches.py, loop.py, and at the end saving.py.

Run directory: `checkpoint-N/`, `adapter/` (peft; a full HF folder in `model/` for full SFT),
`metrics.jsonl`, `loss.png`, `recipe.yaml`, `data_report.json`, and README.md (our model card,
model_card.py). Console output is console.py's; the lr schedule is schedule.py's.

With eval data, the last step is always evaluated (`training.eval_steps` unset: only there),
inside the loop and so before the final checkpoint (loop.LastStep), as HF does at the end of a
run whose eval_steps do not divide its last step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from ..errors import UserError
from ..model.dtypes import announce_auto, dtype_name, resolve_dtype
from . import objectives, qat_data, refusals
from .args import build_args
from .batches import rows_dataset, training_collator
from .build_model import build_model
from .distributed import finish, init_distributed, is_main_process
from .recipe import Recipe, model_dir, output_dir, recipe_to_yaml
from .resume import refuse_finished, resume_state
from .saving import save_final


def prepare_output_dir(recipe: Recipe) -> Path:
    out = output_dir(recipe)
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_objective_data(objective):
    """(tokenizer, config, data) from the objective, bad data refused before any model loads."""
    from ..data.dataset import DataErrors, data_loss

    recipe = objective.recipe
    try:
        tok, cfg, data = objective.prepare()
    except DataErrors as e:
        n = f"{len(e.errors)}{'+' if e.more else ''}"
        raise UserError(
            f"{n} bad sample(s), the first: {e.errors[0]}; `gemma3-tune data check` lists them all"
        ) from None
    warning, refusal = data_loss(data.report, recipe.data)
    if refusal:
        raise UserError(refusal)
    if warning and is_main_process():
        print(warning, file=sys.stderr)
    if not data.train_rows:
        raise UserError("data.train: no samples left to train on")
    return tok, cfg, data


def write_run_files(recipe: Recipe, out: Path, data) -> None:
    """recipe.yaml and data_report.json, by rank 0 once every rank has checked output_dir
    (process groups rendezvous before this)."""
    if is_main_process():
        (out / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        (out / "data_report.json").write_text(json.dumps(data.report.summary(), indent=2) + "\n")


def build_trainer(recipe: Recipe):
    """Everything up to `trainer.train()`, in order. Returns (trainer, output dir, base model
    folder)."""
    if not torch.cuda.is_available():
        # accelerate imports DeepSpeed whenever it is installed; name its accelerator (the one
        # it would pick) so it does not warn "Setting accelerator to CPU" in every CPU run
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = prepare_output_dir(recipe)
    # `auto` becomes the dtype it means here, once: the run's recipe.yaml records that one
    asked, recipe.model.dtype = recipe.model.dtype, dtype_name(resolve_dtype(recipe.model.dtype))
    refusals.refuse(recipe)
    objective = objectives.build(qat_data.resolve(recipe))  # qat.data: the data QAT trains on
    tok, cfg, data = load_objective_data(objective)  # bad data: refused before the model loads
    folder = model_dir(recipe)
    init_distributed(recipe.deepspeed is not None, recipe.training.ddp_timeout)
    resume, universal = resume_state(recipe, out)
    args = build_args(recipe, out, bool(data.eval_rows), universal)  # sets up DeepSpeed
    write_run_files(recipe, out, data)
    model, compiled = build_model(recipe, folder, out, args, objective)
    collator = training_collator(recipe, model, cfg, data, tok.pad_id, compiled)
    train_ds = rows_dataset(data.train_rows, objective.row_fields(data.train_rows, "train"))
    eval_ds = rows_dataset(data.eval_rows, objective.row_fields(data.eval_rows, "eval"))
    from .loop import make_trainer

    trainer = make_trainer(recipe, model, args, objective, collator, train_ds, eval_ds, data, out)
    trainer.resume_checkpoint = resume
    if asked == "auto" and is_main_process():
        announce_auto()  # after every refusal: those stay one line
    return trainer, out, folder


def train(recipe: Recipe, recipe_path: str = "") -> Path:
    trainer, out, folder = build_trainer(recipe)
    resume = trainer.resume_checkpoint
    if resume is not None:
        refuse_finished(trainer, resume)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    save_final(trainer, recipe, out, folder)
    finish()  # the process group, once every rank has saved
    return out
