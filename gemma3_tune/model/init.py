"""Random weights for tests and benchmarks. Every projection is random: transformers leaves
the multimodal projector at zero and the norms at zero, which would hide bugs."""

from __future__ import annotations

import torch
from torch import nn

from .gemma3 import Gemma3
from .layers import RMSNorm
from .siglip import init_vision_weights


@torch.no_grad()
def random_init(model: Gemma3, seed: int = 0, std: float = 0.02) -> Gemma3:
    """Linear layers ~ N(0, 1/fan_in), embeddings ~ N(0, 1/D): activations and (tied) logits of
    order one at any width, so tiny models have peaked predictions and learn in a few steps."""
    g = torch.Generator().manual_seed(seed)
    for module in model.text_model.modules():
        if isinstance(module, nn.Linear):
            module.weight.copy_(
                torch.randn(module.weight.shape, generator=g) * module.in_features**-0.5
            )
        elif isinstance(module, nn.Embedding):
            module.weight.copy_(
                torch.randn(module.weight.shape, generator=g) * module.embedding_dim**-0.5
            )
        elif isinstance(module, RMSNorm):
            module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 0.1)
    if model.vision_tower is not None and model.projector is not None:
        torch.manual_seed(seed + 1)
        init_vision_weights(model.vision_tower, model.projector, std)
    return model
