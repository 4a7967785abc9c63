"""Chatting with a model through our KV cache (loading a run or base + adapter is
train/runs.py's, re-exported here)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..data.images import preprocess
from ..data.template import ImageRef, Tools, Turn, VisionTokens, generation_prompt
from ..data.tokenizer import Tokenizer
from ..errors import UserError
from ..model.gemma3 import Gemma3
from ..model.generate import generate
from ..train.runs import apply_adapter, load_with_adapter, recipe_base, resolve_run


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


__all__ = ["apply_adapter", "chat_ids", "load_with_adapter", "recipe_base", "reply", "resolve_run"]
