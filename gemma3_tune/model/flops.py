"""Training FLOPs of one step, counted honestly, for model FLOPs utilisation (MFU).

The usual 6·N·T overstates LoRA: a frozen weight gets no weight gradient, so it costs 4·N·T
(forward + activation gradient), and only the trainable parameters cost 6·N·T. Attention is
counted over the (query, key) pairs that are actually visible: each document on its own, and
only the last `sliding_window` keys on sliding layers. Per visible pair and head: QKᵀ and PV
are 2·Dh multiply-adds each in the forward (4·Dh FLOPs), and the backward costs twice that.

MFU divides by the card's published dense bf16 peak (`peak_flops`), looked up by the name
`torch.cuda.get_device_name` prints, never a constant: an H100 PCIe is 24% slower than an SXM.
"""

from __future__ import annotations

import re

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


# Dense bf16 tensor-core peak (FP32 accumulate, no 2:4 sparsity) in TFLOP/s, from the vendor's
# datasheets and architecture whitepapers; each pattern matches the normalised device name
# (see `_normalise`). Ambiguous names (a bare "H100": SXM or PCIe?) match nothing, so MFU is
# left empty rather than computed against the wrong card.
_PEAK_BF16_TFLOPS: list[tuple[str, str, float]] = [
    # (card, pattern, TFLOP/s)
    ("H100 PCIe", r"^H100\b.*\b(PCIE|HBM2E)\b", 756.0),  # 1,513 with sparsity
    ("H100 NVL", r"^H100\b.*\bNVL\b", 835.5),  # 1,671 with sparsity
    ("H100 SXM", r"^H100\b.*\b(SXM\d?|HBM3)\b", 989.4),  # 1,979 with sparsity
    ("H200 NVL", r"^H200\b.*\bNVL\b", 835.5),  # 1,671 with sparsity: NVL is capped at 600 W
    ("H200 SXM", r"^H200\b(?!.*\bNVL\b)", 989.4),  # 1,979 with sparsity
    ("A100", r"^A100\b", 312.0),  # SXM4 and PCIe, 40 and 80 GB alike; 624 with sparsity
    ("L40S", r"^L40S$", 362.05),  # 733 with sparsity
    # GeForce: bf16 with FP32 accumulate runs at half the FP16-accumulate rate (330.3); torch
    # accumulates bf16 matmuls in FP32, so 165.2 is the ceiling it can reach.
    ("RTX 4090", r"^RTX 4090$", 165.2),
]


def _normalise(device_name: str) -> str:
    """`torch.cuda.get_device_name` spellings to one form: "NVIDIA A100-SXM4-80GB" ->
    "A100 SXM4 80GB", "NVIDIA GeForce RTX 4090" -> "RTX 4090"."""
    words = re.sub(r"[-_/]", " ", device_name.upper()).split()
    return " ".join(w for w in words if w not in ("NVIDIA", "GEFORCE"))


def _lookup(device_name: str) -> tuple[str, float] | None:
    name = _normalise(device_name)
    return next(((card, t) for card, pat, t in _PEAK_BF16_TFLOPS if re.search(pat, name)), None)


def peak_card(device_name: str) -> str | None:
    """Which card of the peak table `device_name` is (None: not in the table)."""
    hit = _lookup(device_name)
    return hit[0] if hit else None


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 tensor-core peak of the card in FLOP/s (no sparsity), the denominator of MFU;
    None for a card the table does not know (MFU is then not reported)."""
    hit = _lookup(device_name)
    return hit[1] * 1e12 if hit else None
