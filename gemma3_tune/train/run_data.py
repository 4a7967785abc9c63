"""A run's tokenizer, model config and prepared data (data/prepare.py's cache, or prepared
now), as `train`, `data check` and the objectives ask for them: no weights are loaded."""

from __future__ import annotations

from ..data.tokenizer import Tokenizer
from ..errors import UserError
from .recipe import Recipe, model_dir


def tokenizer_and_config(recipe: Recipe):
    """The student's tokenizer and model config (no weights)."""
    from ..model.checkpoint import read_config

    folder = model_dir(recipe)
    try:
        tok = Tokenizer(folder)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"model.path: {e}") from None
    return tok, read_config(folder)


def load_data(recipe: Recipe, answers=None, prompts=None):
    """Tokenizer, model config and prepared data for a recipe: from the cache when these
    inputs were prepared before, else prepared now (DataErrors propagate). `answers`: the
    teacher's replies to prompt-only samples (distillation, data/answers.py), `prompts` the
    ones this data has (the cache key then covers their replies only)."""
    from ..data.prepare import prepare

    tok, cfg = tokenizer_and_config(recipe)
    folder = model_dir(recipe)
    data = prepare(
        recipe.data,
        folder,
        cfg,
        recipe.base_dir,
        recipe.training.seed,
        answers=answers,
        pairs=recipe.objective in ("dpo", "orpo"),
    )
    return tok, cfg, data
