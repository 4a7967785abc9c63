"""Loading what a run trained: its base folder and adapter, folded into our model.

Used by `export`, `generate` and `eval` (through export/) and by distillation, whose teacher may
be a run directory (train/ cannot import export/: the arrows point cli -> export -> train).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..model.checkpoint import load_model
from ..model.gemma3 import Gemma3
from .recipe import Recipe, model_dir


def _run_recipe(src: Path) -> dict | None:
    """A run directory's recipe.yaml as written (None: not a run)."""
    if not (src / "recipe.yaml").is_file():
        return None
    import yaml

    return yaml.safe_load((src / "recipe.yaml").read_text())


def run_method(src: Path) -> str | None:
    """The `method` a run directory's recipe trained with (None: not a run)."""
    recipe = _run_recipe(src)
    return None if recipe is None else recipe.get("method", "lora")


def run_dtype(src: Path) -> str | None:
    """The dtype a run trained in (`train` records what `auto` resolved to), or None: not a
    run, or a run from before that was recorded."""
    dtype = ((_run_recipe(src) or {}).get("model") or {}).get("dtype")
    return None if dtype in (None, "auto") else dtype


def decode_dtype(dtype: str, sources: list[Path]) -> torch.dtype:
    """The dtype `eval` and `generate` load models in: `dtype` as given; `auto`: the dtype the
    first run directory among `sources` trained in, else the machine's (model/dtypes.py, its
    choice printed once)."""
    from ..model.dtypes import announce_auto, resolve_dtype

    if dtype == "auto":
        dtype = next((d for d in map(run_dtype, sources) if d), "auto")
    if dtype == "auto":
        announce_auto()
    return resolve_dtype(dtype)


def recipe_base(run: Path) -> Path:
    """The base model folder a run's recipe.yaml names."""
    import yaml

    return model_dir(Recipe.model_validate(yaml.safe_load((run / "recipe.yaml").read_text())))


def resolve_run(src: Path) -> tuple[Path, Path | None]:
    """(base model folder, adapter folder or None) for a run directory or a model folder."""
    src = Path(src)
    if (src / "config.json").is_file():
        return src, None
    recipe = src / "recipe.yaml"
    if not recipe.is_file():
        raise UserError(
            f"{src}: neither a model folder (config.json) nor a run directory (recipe.yaml)"
        )
    base = recipe_base(src)
    if (src / "model" / "config.json").is_file():  # full SFT
        return src / "model", None
    if (src / "adapter").is_dir():
        return base, src / "adapter"
    raise UserError(f"{src}: the run has no adapter/ or model/ yet (did it finish?)")


def load_with_adapter(base: Path, adapter: Path | None, dtype=None, device: str = "cpu") -> Gemma3:
    """Our model with a peft adapter (or a projector-only adapter) merged in."""
    return apply_adapter(load_model(base, dtype=dtype, device=device), adapter)


def apply_adapter(model: Gemma3, adapter: Path | None) -> Gemma3:
    """Fold a run's adapter into `model`: peft LoRA/DoRA (a trained projector or embedding,
    saved as modules_to_save, replaces the base's on merge) or a projector-only adapter."""
    if adapter is None:
        return model
    proj_file = adapter / "projector.safetensors"
    if proj_file.is_file():  # method: none
        from safetensors.torch import load_file

        state = load_file(str(proj_file))
        prefix = "model.multi_modal_projector."
        model.projector.load_state_dict(
            {k.removeprefix(prefix): v for k, v in state.items()}, strict=True
        )
        return model
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: no adapter_config.json (not a peft adapter)")
    import peft

    # A trained embedding's config asks peft to tie transformers' separate lm_head to it
    # (adapters.portable_config); our head reads the embedding itself: nothing to tie.
    cfg = peft.PeftConfig.from_pretrained(str(adapter))
    cfg.ensure_weight_tying = False
    return peft.PeftModel.from_pretrained(
        model, str(adapter), config=cfg, is_trainable=False
    ).merge_and_unload()
