"""The frozen SigLIP vision tower and the projector that turns its patches into soft tokens.

pixels `[N, 3, S, S]` -> SigLIP -> `[N, P*P, Dv]` patch features -> average pool to
`[N, mm_tokens, Dv]` -> RMSNorm -> matmul into the text width `[N, mm_tokens, D]`.

Module names follow transformers 5 (`embeddings.patch_embedding`, ...); published checkpoints
add a `vision_model.` level, which checkpoint.py's name table removes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Gemma3Config, VisionConfig, pool_kernel
from .layers import RMSNorm


class SiglipAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape

        def split(y: Tensor) -> Tensor:  # [B, T, D] -> [B, H, T, D/H]
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)  # full (bidirectional) attention
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class SiglipMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = SiglipAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = SiglipMLP(c)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size)
        self.position_embedding = nn.Embedding(c.patches_per_side**2, c.hidden_size)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # [N, Dv, P, P]
        x = x.flatten(2).transpose(1, 2)  # [N, P*P, Dv]
        return x + self.position_embedding.weight[None]


class SiglipEncoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipLayer(c) for _ in range(c.num_hidden_layers))


class VisionTower(nn.Module):
    """Frozen SigLIP: never trained, always in eval mode, always run without autograd.

    Its output never changes during training, so it can be computed once and cached.
    """

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(c)
        self.encoder = SiglipEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VisionTower:
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixels: Tensor) -> Tensor:
        x = self.embeddings(pixels)  # [N, P*P, Dv]
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)  # [N, P*P, Dv]


def pool_patches(patches: Tensor, c: Gemma3Config) -> Tensor:
    """`[N, P*P, Dv]` patches -> `[N, mm_tokens, Dv]` by average pooling the patch grid. It has
    no weights, so its output can be cached together with the frozen tower's."""
    assert c.vision is not None
    n, seq, dv = patches.shape
    p, k = c.vision.patches_per_side, pool_kernel(c)
    assert seq == p * p, f"expected {p * p} patches, got {seq}"
    grid = patches.transpose(1, 2).reshape(n, dv, p, p)  # [N, Dv, P, P]
    pooled = F.avg_pool2d(grid, k, k)  # [N, Dv, P/k, P/k]
    return pooled.flatten(2).transpose(1, 2)  # [N, mm_tokens, Dv]


class MultiModalProjector(nn.Module):
    """Normalise pooled SigLIP features and project them to the text width."""

    def __init__(self, c: Gemma3Config):
        super().__init__()
        assert c.vision is not None
        self.mm_soft_emb_norm = RMSNorm(c.vision.hidden_size, eps=c.vision.layer_norm_eps)
        # Stored (vision_hidden, text_hidden): applied as a matmul, not as an nn.Linear.
        self.mm_input_projection_weight = nn.Parameter(
            torch.zeros(c.vision.hidden_size, c.hidden_size)
        )

    def forward(self, pooled: Tensor) -> Tensor:
        """The trainable part: pooled features `[N, mm_tokens, Dv]` -> `[N, mm_tokens, D]`.

        Only `forward` is called on it, so peft's `modules_to_save` wrapper (which trains a
        copy of this module) is used whenever the projector is trained."""
        normed = self.mm_soft_emb_norm(pooled)
        weight = self.mm_input_projection_weight
        return torch.matmul(normed.to(weight.dtype), weight)  # [N, mm_tokens, D]


def init_vision_weights(
    tower: VisionTower, projector: MultiModalProjector, std: float = 0.02
) -> None:
    """Random init for tests: every projection random (transformers leaves the projector at 0)."""
    for m in tower.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            nn.init.normal_(m.weight, std=std)
            nn.init.normal_(m.bias, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.normal_(m.weight, mean=1.0, std=std)
            nn.init.normal_(m.bias, std=std)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
    dv = projector.mm_input_projection_weight.shape[0]
    nn.init.normal_(projector.mm_input_projection_weight, std=1 / math.sqrt(dv))
    nn.init.normal_(projector.mm_soft_emb_norm.weight, std=0.1)
