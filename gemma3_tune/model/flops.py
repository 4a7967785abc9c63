"""Training FLOPs of one step, counted honestly, for model FLOPs utilisation (MFU).

The usual 6·N·T overstates LoRA: a frozen weight gets no weight gradient, so it costs 4·N·T
(forward + activation gradient), and only the trainable parameters cost 6·N·T. Attention is
counted over the (query, key) pairs that are actually visible: each document on its own, and
only the last `sliding_window` keys on sliding layers. Per visible pair and head: QKᵀ and PV
are 2·Dh multiply-adds each in the forward (4·Dh FLOPs), and the backward costs twice that.
"""

from __future__ import annotations

from .config import GLOBAL, Gemma3Config


def visible_pairs(doc_len: int, window: int | None) -> int:
    """(query, key) pairs a causal document of `doc_len` tokens attends over: query i sees
    min(i + 1, window) keys."""
    if window is None or window >= doc_len:
        return doc_len * (doc_len + 1) // 2
    return window * (window + 1) // 2 + (doc_len - window) * window


def linear_params(c: Gemma3Config) -> int:
    """Weights of the decoder's matmuls, the tied LM head included (embedding lookups are free)."""
    attn = 2 * c.hidden_size * c.head_dim * (c.num_attention_heads + c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (attn + mlp) + c.vocab_size * c.hidden_size


def train_step_flops(
    c: Gemma3Config,
    doc_lengths: list[int],
    adapter_params: int = 0,
    full: bool = False,
    head_tokens: int | None = None,
) -> float:
    """FLOPs of one forward + backward over `doc_lengths` (the documents of every row).

    adapter_params: LoRA A and B weights (6 FLOPs per token each); full: the base weights
    train too (6 instead of 4 per token); head_tokens: positions that go through the LM head
    (our loss projects only labelled ones; default every token)."""
    tokens = sum(doc_lengths)
    per_weight = 6 if full else 4
    head = c.vocab_size * c.hidden_size
    flops = per_weight * (linear_params(c) - head) * tokens + 6 * adapter_params * tokens
    flops += per_weight * head * (tokens if head_tokens is None else head_tokens)
    per_pair = 3 * 4 * c.head_dim * c.num_attention_heads  # forward 4·Dh·H, backward twice that
    for layer_type in c.layer_types:
        window = None if layer_type == GLOBAL else c.sliding_window
        flops += per_pair * sum(visible_pairs(n, window) for n in doc_lengths)
    return float(flops)
