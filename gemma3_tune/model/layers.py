"""Small building blocks: Gemma's RMSNorm, rotary embeddings, the GeGLU MLP, and the dtypes
activations and the residual stream run in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def activation_dtype(weight: Tensor) -> torch.dtype:
    """The dtype activations run in: autocast's when it is on (fp32 master weights, compute in
    bf16: train/precision.py), else the weights' own."""
    kind = weight.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def residual_dtype(compute: torch.dtype) -> torch.dtype:
    """The residual stream's dtype: the compute dtype, except fp32 when computing in fp16.
    Gemma 3's residual stream outgrows fp16's 65,504 (measured on the real 270M in fp32: up
    to 104,061 by layer 14 on the quickstart chats, so fp16 gave NaN losses), while what feeds
    the matmuls stays small (normed inputs; linear outputs <= 2,000 there). So in fp16 the
    embedding, the residual adds and every norm's input are fp32, the matmuls fp16."""
    return torch.float32 if compute == torch.float16 else compute


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: `x * rsqrt(mean(x^2) + eps) * (1 + w)`, computed in fp32.

    Checkpoints store `w` (initialised to 0); GGUF files store `1 + w`.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Returns `dtype` (default: x's): the residual stream and the compute dtype differ in
        float16 (residual_dtype)."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(dtype or x.dtype)


def rope_inv_freq(head_dim: int, base: float, scaling_factor: float = 1.0) -> Tensor:
    """`[head_dim / 2]` inverse frequencies; linear scaling divides them by the factor."""
    # Explicit CPU device: models are built under torch.device("meta") when loading.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (base**exponents) / scaling_factor


def rope_cos_sin(
    inv_freq: Tensor, position_ids: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos, sin of shape `[B, T, head_dim]` (half-split layout), computed in fp32."""
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: `[B, H, T, D]`; cos/sin: `[B, T, D]`. Rotates the two halves of each head."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class GeGLU(nn.Module):
    """`down(gelu_tanh(gate(x)) * up(x))`."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))
