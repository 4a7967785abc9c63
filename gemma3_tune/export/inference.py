"""Loading a model for inference (a plain folder, a run directory, or base + adapter) and
chatting with it through our KV cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..data.images import preprocess
from ..data.template import ImageRef, Tools, Turn, VisionTokens, generation_prompt
from ..data.tokenizer import Tokenizer
from ..errors import UserError
from ..model.checkpoint import load_model
from ..model.gemma3 import Gemma3
from ..model.generate import generate


def recipe_base(run: Path) -> Path:
    """The base model folder a run's recipe.yaml names."""
    import yaml

    from ..train.recipe import Recipe, model_dir

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
    """Fold a run's adapter into `model`: peft LoRA/DoRA (a trained projector, saved as
    modules_to_save, replaces the base's on merge) or a projector-only adapter."""
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

    return peft.PeftModel.from_pretrained(
        model, str(adapter), is_trainable=False
    ).merge_and_unload()


def chat_ids(
    tok: Tokenizer,
    model: Gemma3,
    prompt: str,
    images: list[str] = (),
    system: str | None = None,
    pan_and_scan: bool = False,
    history: list[Turn] = (),
    tools: list[dict] = (),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt ids `[1, T]` ending in `<start_of_turn>model\\n`, and the pixel values.
    `history`: earlier user/assistant turns of the conversation (text only); `tools`: function
    schemas the model may call (rendered as training renders them)."""
    c = model.config
    vision = None
    if images:
        if not c.is_multimodal:
            raise UserError("--image given, but the model is text-only")
        vision = VisionTokens(
            c.image_token_id, c.boi_token_id, c.eoi_token_id, c.mm_tokens_per_image
        )
    pixels = [preprocess(p, c.vision.image_size, pan_and_scan) for p in images] if images else []
    parts: list = [
        ImageRef(str(p), views=px.shape[0]) for p, px in zip(images, pixels, strict=True)
    ]
    parts.append(prompt)
    head = [system] if system else []
    if tools:
        head.append(Tools(list(tools)))
    turns = ([Turn("system", head)] if head else []) + list(history) + [Turn("user", parts)]
    ids, _ = generation_prompt(turns, tok, vision)
    return torch.tensor([ids]), (torch.cat(pixels) if pixels else None)


def reply(
    model: Gemma3,
    tok: Tokenizer,
    prompt: str,
    images: list[str] = (),
    max_new_tokens: int = 64,
    **kw,
) -> Iterator[int]:
    system = kw.pop("system", None)
    history = kw.pop("history", ())
    tools = kw.pop("tools", ())
    ids, pixels = chat_ids(tok, model, prompt, list(images), system, history=history, tools=tools)
    device = next(model.parameters()).device
    if pixels is not None:
        pixels = pixels.to(device, next(model.parameters()).dtype)
    stops = tok.stop_ids()
    return generate(
        model,
        ids.to(device),
        max_new_tokens=max_new_tokens,
        pixel_values=pixels,
        stop_ids=stops,
        **kw,
    )
