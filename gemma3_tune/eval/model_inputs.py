"""What a loaded target needs to read a sample: its image tokens, and images as pixels."""

from __future__ import annotations

import torch

from ..data.template import ImageRef, VisionTokens


def vision_of(model) -> VisionTokens | None:
    """The model's image tokens for the template (None: a text-only model)."""
    c = model.config
    if not c.is_multimodal:
        return None
    return VisionTokens(c.image_token_id, c.boi_token_id, c.eoi_token_id, c.mm_tokens_per_image)


def pixels(model, images: list[ImageRef]) -> torch.Tensor | None:
    """The images preprocessed as the model's tower takes them, on its device and dtype."""
    from ..data.images import preprocess

    if not images:
        return None
    p = next(model.parameters())
    size = model.config.vision.image_size
    px = torch.cat([preprocess(im.path, size, im.views > 1) for im in images])
    return px.to(p.device, p.dtype)
