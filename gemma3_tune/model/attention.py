"""Self-attention: Gemma 3's attention layer and its two backends.

The layer: GQA, QK-norm before RoPE, scale `query_pre_attn_scalar ** -0.5`, and the KV cache
append (sliding layers keep only their last `window - 1` keys). The backends: SDPA with a dense
boolean mask (CPU, generation, and the reference; query-chunked on the CPU so a long row skips
the keys no query can see) and FlexAttention with a BlockMask (GPU; compiled once, tiles chosen
for the device in flex_kernels.py). Which one a batch runs is chosen by `Gemma3._backend`; the
masks themselves are built in masks.py.

Shapes: B batch, T new tokens, S keys (cached + new), H heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import GLOBAL, Gemma3Config
from .context_parallel import ContextMask
from .kv_cache import KVCache
from .layers import RMSNorm, activation_dtype, apply_rope


class Attention(nn.Module):
    def __init__(self, c: Gemma3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = c.layer_types[layer_idx]
        self.heads, self.kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.scale = c.query_pre_attn_scalar**-0.5
        self.window = None if self.layer_type == GLOBAL else c.sliding_window
        self.q_proj = nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask, cache: KVCache | None) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, Dh]
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(self.q_norm(q), cos, sin)  # QK-norm before RoPE
        k = apply_rope(self.k_norm(k), cos, sin)
        if cache is not None:
            i = self.layer_idx
            if cache.keys[i] is not None:
                k = torch.cat([cache.keys[i], k], dim=2)  # [B, K, S, Dh]
                v = torch.cat([cache.values[i], v], dim=2)
            keep = k.shape[2] if self.window is None else min(k.shape[2], self.window - 1)
            cache.keys[i], cache.values[i] = k[:, :, -keep:], v[:, :, -keep:]
        if isinstance(mask, ContextMask):  # context parallelism: the halo, or the whole row
            k, v = mask.keys_values(k, v)
            mask = mask.dense
        if isinstance(mask, Tensor):  # SDPA with a dense boolean mask [B, 1, T, S]
            out = sdpa_dense(q, k, v, mask, self.scale)
        else:  # FlexAttention with a BlockMask, tiles chosen for the device (flex_kernels.py)
            out = _flex_attention()(
                q, k, v, block_mask=mask.block_mask, scale=self.scale, enable_gqa=True,
                kernel_options=mask.kernel_options,
            )  # fmt: skip
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


@dataclass
class FlexMask:
    """What a FlexAttention layer needs besides q, k, v: the BlockMask of its layer type and
    the kernel options for the device (None: torch's defaults)."""

    block_mask: object  # torch.nn.attention.flex_attention.BlockMask
    kernel_options: dict | None


QUERY_CHUNK = 256  # queries per SDPA call when a long row is split (see sdpa_query_chunks)


def sdpa_dense(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """SDPA with a dense boolean mask. On CUDA, K/V are expanded to every query head: with GQA
    and a mask torch has no fused kernel (it runs the math backend, which materialises the
    scores), while with equal heads the memory-efficient kernel takes the mask. Elsewhere, the
    query-chunked call below. q: [B, H, T, Dh]; k, v: [B, K, S, Dh]; mask: [B, 1, T, S]."""
    if q.is_cuda:
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return sdpa_query_chunks(q, k, v, mask, scale)


@torch.compiler.disable  # data-dependent slicing: a compiled layer runs it eagerly, between graphs
def sdpa_query_chunks(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, chunk: int = QUERY_CHUNK
) -> Tensor:
    """SDPA with a dense mask, skipping key blocks that no query of a chunk can see.

    CPU SDPA computes every (query, key) pair a dense mask covers, visible or not. Split into
    chunks of `chunk` queries, each call only gets the key span its queries can see: on a
    sliding layer (window W) that is about chunk + W keys instead of the whole row, and on a
    global layer the keys after the chunk (causal) drop out. The result is the same softmax
    over the same visible keys. q: [B, H, T, Dh]; k, v: [B, K, S, Dh]; mask: [B, 1, T, S].
    """
    gqa = q.shape[1] != k.shape[1]
    t, s = q.shape[2], k.shape[2]
    if t <= 2 * chunk:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    seen = mask.any(dim=1).any(dim=0)  # [T, S]: key j visible to query i in some row
    outs = []
    for a in range(0, t, chunk):
        cols = seen[a : a + chunk].any(dim=0)  # [S]
        lo = int(cols.int().argmax())  # first visible key
        hi = s - int(cols.flip(0).int().argmax())  # one past the last
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, a : a + chunk],
                k[:, :, lo:hi],
                v[:, :, lo:hi],
                attn_mask=mask[:, :, a : a + chunk, lo:hi],
                scale=scale,
                enable_gqa=gqa,
            )
        )
    return torch.cat(outs, dim=2)  # [B, H, T, Dh]


_FLEX = None


def _flex_attention():
    """flex_attention compiled once (on CPU too, where it runs forward only: torch has no CPU
    backward). Uncompiled, it materialises the whole score matrix. Inside a compiled layer it is
    traced with the layer, so the raw function is returned there.

    Compiled with static shapes: one graph per (batch length, layer type, grad mode), which
    `flex_graph_budget` counts and `bound_recompiles` makes the recompile limit (gemma3.py),
    with a loud error past it: torch's own behaviour at its limit (8 by default) is to run the
    unfused path, an out-of-memory hours into a run at long lengths."""
    global _FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():
        return flex_attention
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def flex_options(device: torch.device, head_dim: int, weight: Tensor) -> dict | None:
    """FlexAttention kernel options for this device (flex_kernels.py), logged once per device.
    Where no tile fits the card's shared memory the model was set to SDPA before training."""
    from .flex_kernels import USE_SDPA, options_for_device

    options, line = options_for_device(device, head_dim, activation_dtype(weight))
    if device.type == "cuda" and line not in _LOGGED:
        _LOGGED.add(line)
        print(line, file=sys.stderr)
    return None if options == USE_SDPA else options


_LOGGED: set[str] = set()
