"""ggml's Q4_0, Q5_0 and Q8_0 block formats in torch, bit-exact with the `gguf` package.

`formats.GGUF_TYPES` is the one list of what `export --format gguf` can store: the CLI's choices, the
recipe's `qat.format`, the writer's file types and the export's read-back tolerances all read
it. What trains is what ships: QAT fake-quantizes with `fake_quantize`; the GGUF writer stores
blocks with the gguf package's `quantize` (llama.cpp's reference, what its converter uses), and
the export reads every block back and requires it bitwise equal to `fake_quantize` of the
weight (`export/hf_export.py: _verify_gguf`); `quantize_blocks` / `pack_blocks` reproduce the
blocks' bytes and are tested against gguf-py's. The oracle is gguf-py's numpy implementation (`gguf/quants.py`, classes `Q4_0`,
`Q5_0`, `Q8_0`), which follows llama.cpp's `quantize_row_q4_0_ref`, `quantize_row_q5_0_ref`
and `quantize_row_q8_0_ref` (ggml/src/ggml-quants.c). Each format cuts the last dimension
into blocks of 32 weights; each block stores one float16 scale `d` and 32 integer codes.

Q8_0 (`block_q8_0`: `ggml_half d; int8_t qs[32]` = 34 bytes, 8.5 bits per weight)
    d = amax / 127 (amax = max |x| over the block, fp32 division), id = 1 / d (0 if d == 0),
    q = roundf(x * id): round half AWAY from zero (C's roundf; gguf's `np_roundf`), not numpy's
    half-to-even. Dequantized: q * f16(d).
Q4_0 (`block_q4_0`: `ggml_half d; uint8_t qs[16]` = 18 bytes, 4.5 bits per weight)
    m = the block's value of largest magnitude, WITH its sign (the first one on ties: C's
    `amax < fabsf(v)`, numpy's argmax), d = m / -8, id = 1 / d (0 if d == 0),
    q = min(15, trunc(x * id + 8.5)) in 0..15, so m itself maps to code 0 (-8 * d = m) and the
    opposite extreme would be +8, clipped to 7. Dequantized: (q - 8) * f16(d).
    Byte j of qs holds q[j] in its low nibble and q[j + 16] in its high nibble.
Q5_0 (`block_q5_0`: `ggml_half d; uint8_t qh[4]; uint8_t qs[16]` = 22 bytes, 5.5 bits)
    As Q4_0 with d = m / -16 and q = min(31, trunc(x * id + 16.5)) in 0..31; dequantized
    (q - 16) * f16(d). qs holds the low 4 bits as in Q4_0; bit j of the little-endian uint32 qh
    is bit 4 of q[j].

In all three the codes are computed from the fp32 d, not the f16-rounded one that is stored
(ggml does the same), so the dequantized block is `code * f16(d)`. A block of zeros has d = 0,
id = 0 and dequantizes to zeros. Every step is the same IEEE fp32 operation numpy performs (no
float64 anywhere in gguf-py's path for these types), in the same order, so results match bit
for bit in eager mode on CPU and CUDA. (Divisions use tensor divisors: torch turns a division
by a Python scalar into a multiplication by its reciprocal on CUDA, which rounds differently
for 127. Under torch.compile a backend may fuse `x * id + 8.5` into one FMA, which can move a
code at a rounding boundary; export runs eagerly.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .formats import FORMATS  # q4_0, q5_0, q8_0: the block formats QAT trains and export writes

BLOCK = 32  # weights per block (QK4_0 = QK5_0 = QK8_0 = 32 in ggml-common.h)

# Bits per weight = block bytes * 8 / block weights, from ggml-common.h's block structs
# (ggml_half = 2 bytes, QK_K = 256; gguf's GGML_QUANT_SIZES holds the same (weights, bytes)).
_BITS_PER_WEIGHT = {
    "f32": 32.0,
    "f16": 16.0,
    "bf16": 16.0,
    "q4_0": 18 * 8 / 32,  # block_q4_0: d (2) + qs[16] = 18 bytes / 32 weights = 4.5
    "q5_0": 22 * 8 / 32,  # block_q5_0: d (2) + qh[4] + qs[16] = 22 bytes / 32 = 5.5
    "q8_0": 34 * 8 / 32,  # block_q8_0: d (2) + qs[32] = 34 bytes / 32 = 8.5
    "q4_k": 144 * 8 / 256,  # block_q4_K: d, dmin (4) + scales[12] + qs[128] = 144 / 256 = 4.5
    "q5_k": 176
    * 8
    / 256,  # block_q5_K: d, dmin (4) + scales[12] + qh[32] + qs[128] = 176 / 256 = 5.5
    "q6_k": 210 * 8 / 256,  # block_q6_K: ql[128] + qh[64] + scales[16] + d (2) = 210 / 256 = 6.5625
}

# fmt -> (largest-magnitude divisor, code offset, largest code); Q8_0 is symmetric instead.
_SIGNED_MAX = {"q4_0": (-8.0, 8, 15), "q5_0": (-16.0, 16, 31)}


def bits_per_weight(fmt: str) -> float:
    """Storage cost of one weight in `fmt`, scales included (q4_0 4.5, q8_0 8.5, q6_k 6.5625)."""
    key = fmt.lower()
    if key not in _BITS_PER_WEIGHT:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(_BITS_PER_WEIGHT)}")
    return _BITS_PER_WEIGHT[key]


def check_width(k: int, fmt: str, name: str) -> None:
    """Refuse a tensor whose last dimension `k` does not split into 32-weight blocks."""
    _format(fmt)
    if k % BLOCK:
        raise ValueError(
            f"{name}: last dimension {k} is not a multiple of {BLOCK}, so it cannot be stored as "
            f"{fmt.upper()} blocks; keep it in f16 (llama.cpp's convert_hf_to_gguf.py catches "
            f"gguf's QuantError for such a tensor and writes it as F16)"
        )


def fake_quantize(w: Tensor, fmt: str) -> Tensor:
    """Quantize then dequantize `w` ([..., K], K % 32 == 0) exactly as ggml would store it.

    Equals, bitwise in fp32, gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), T), T).
    Any float dtype is computed in fp32 (as gguf-py does) and returned in w's dtype.

    Q4_0 and Q5_0 keep the codes in fp32 and work in place (the codes, 0..31, and code - offset
    are exact there): QAT runs this on every decoder weight twice a step, and the integer
    round trip of quantize_blocks -> dequantize_blocks doubled its passes over memory.
    """
    fmt = _format(fmt)
    if fmt == "q8_0":
        d, q = quantize_blocks(w, fmt)
        return dequantize_blocks(d, q, fmt).to(w.dtype)
    x = _blocks(w, fmt)  # [..., K/32, 32] fp32
    divisor, offset, top = _SIGNED_MAX[fmt]
    d = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True)) / _scalar(divisor, x)  # [..., K/32, 1]
    codes = x * _reciprocal_or_zero(d)  # quantize_blocks' q, in fp32, then minus the offset:
    codes.add_(offset + 0.5).trunc_().clamp_(max=top).sub_(offset)
    return codes.mul_(d.to(torch.float16).float()).flatten(-2).to(w.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: fake_quantize(w), exactly. Backward: the upstream gradient, unchanged."""

    @staticmethod
    def forward(ctx, w: Tensor, fmt: str) -> Tensor:
        return fake_quantize(w, fmt)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def ste(w: Tensor, fmt: str) -> Tensor:
    """Straight-through estimator for QAT: the forward value is fake_quantize(w, fmt), the
    gradient passes as if quantization were the identity.

    A custom Function makes the forward value fq by construction, rather than by trusting
    `w + (fq - w).detach()` to round back to fq (it does for finite fq near w, by Sterbenz's
    lemma, but nothing checks it under autocast or a compiler), and it saves no tensors.
    """
    return _StraightThrough.apply(w, fmt)


def quantize_blocks(w: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
    """What ggml stores for `w` [..., K]: (d float16 [..., K/32], codes [..., K]).

    Codes are unpacked: int8 in -127..127 for q8_0, uint8 in 0..15 (q4_0) or 0..31 (q5_0).
    """
    fmt = _format(fmt)
    x = _blocks(w, fmt)  # [..., K/32, 32] fp32
    if fmt == "q8_0":
        d = x.abs().amax(dim=-1, keepdim=True) / _scalar(127.0, x)  # [..., K/32, 1]
        q = _round_half_away(x * _reciprocal_or_zero(d)).to(torch.int8)
    else:
        divisor, offset, top = _SIGNED_MAX[fmt]
        imax = x.abs().argmax(dim=-1, keepdim=True)  # the first of equal magnitudes
        d = x.gather(-1, imax) / _scalar(divisor, x)  # [..., K/32, 1], keeps the sign
        q = torch.trunc(x * _reciprocal_or_zero(d) + (offset + 0.5)).clamp(max=top).to(torch.uint8)
    return d.squeeze(-1).to(torch.float16), q.flatten(-2)


def dequantize_blocks(d: Tensor, q: Tensor, fmt: str) -> Tensor:
    """The fp32 weights [..., K] that ggml reads back from scales d [..., K/32] and codes q."""
    fmt = _format(fmt)
    offset = 0 if fmt == "q8_0" else _SIGNED_MAX[fmt][1]
    codes = (q.to(torch.int16) - offset).float().unflatten(-1, (-1, BLOCK))  # [..., K/32, 32]
    return (d.float().unsqueeze(-1) * codes).flatten(-2)


def pack_blocks(d: Tensor, q: Tensor, fmt: str) -> Tensor:
    """The bytes gguf.quants.quantize writes: uint8 [..., K/32 * block bytes], little-endian."""
    fmt = _format(fmt)
    scale = d.contiguous().view(torch.uint8).unflatten(-1, (-1, 2))  # [..., K/32, 2]
    q = q.unflatten(-1, (-1, BLOCK))  # [..., K/32, 32]
    if fmt == "q8_0":
        parts = [scale, q.view(torch.uint8)]
    else:
        low = q & 0x0F
        qs = low[..., :16] | (low[..., 16:] << 4)  # [..., K/32, 16]
        parts = [scale, qs]
        if fmt == "q5_0":
            high = ((q >> 4) & 1).unflatten(-1, (4, 8))  # [..., K/32, 4 bytes, 8 bits]
            shifts = torch.arange(8, device=q.device, dtype=torch.uint8)
            parts.insert(1, (high << shifts).sum(-1, dtype=torch.uint8))  # qh, [..., K/32, 4]
    return torch.cat(parts, dim=-1).flatten(-2)


def _format(fmt: str) -> str:
    key = fmt.lower()
    if key not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; known: {', '.join(FORMATS)}")
    return key


def _blocks(w: Tensor, fmt: str) -> Tensor:
    """w [..., K] as fp32 blocks [..., K/32, 32]."""
    if not w.is_floating_point():
        raise ValueError(f"{fmt} quantization needs a float tensor, got {w.dtype}")
    check_width(w.shape[-1], fmt, f"tensor of shape {tuple(w.shape)}")
    return w.float().unflatten(-1, (-1, BLOCK))


def _scalar(value: float, like: Tensor) -> Tensor:
    """A 0-dim fp32 tensor on `like`'s device: a true IEEE divisor on every backend."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _reciprocal_or_zero(d: Tensor) -> Tensor:
    """ggml's `id = d ? 1.0f/d : 0.0f`."""
    return torch.where(d == 0, torch.zeros_like(d), torch.reciprocal(d))


def _round_half_away(n: Tensor) -> Tensor:
    """C's roundf, written as gguf's `np_roundf` (sign(n) * (floor|n| + floor(2 * frac|n|)));
    `floor(|n| + 0.5)` would differ for 0.49999997, where the sum rounds up to 1."""
    a = n.abs()
    floored = torch.floor(a)
    return torch.sign(n) * (floored + torch.floor(2 * (a - floored)))
