"""Trackers besides metrics.jsonl: HF's `report_to`, from the recipe (training.report_to and the
wandb section), each writing under the run unless its own environment variable says where."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import UserError
from .recipe import Recipe


def report_to(recipe: Recipe, out: Path) -> list[str]:
    """HF's `report_to` for the recipe: training.report_to, plus wandb when wandb.project is set
    (and not disabled). Each tracker writes under the run unless its own variable says where;
    one that is not installed is refused in one line before the model loads."""
    names = list(dict.fromkeys(recipe.training.report_to))
    if recipe.wandb.project and recipe.wandb.mode != "disabled" and "wandb" not in names:
        names.append("wandb")
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise UserError(f"training.report_to: {name} is not installed; pip install {name}")
    if "wandb" in names:
        if recipe.wandb.project:
            os.environ["WANDB_PROJECT"] = recipe.wandb.project
        os.environ["WANDB_MODE"] = recipe.wandb.mode
        os.environ.setdefault("WANDB_DIR", str(out))
    if "tensorboard" in names:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "tensorboard"))
    if "mlflow" in names:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (out / "mlruns").as_uri())
    return names
