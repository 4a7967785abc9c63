"""Attention masks for packed rows, derived only from `input_ids` and `position_ids`.

A packed row holds several documents; each restarts its positions at 0. From that we get,
per token:
- `doc`:   which document it belongs to (a new one starts wherever the position does not grow);
- `block`: which image block it is in (0 for text), a run of `image_token_id` inside one doc.

A key k is visible to a query q when they are in the same document, and
- k is causal (pos_k <= pos_q) or both are image tokens of the same image block (bidirectional
  inside an image), and
- on sliding layers, k is not too far back: pos_q - pos_k < W (the window is ANDed on top, as
  in the Gemma 3 reference implementation and transformers).

Positions rather than indices make the same rule work for a KV cache, whose keys carry the
positions they were written at. Within one document positions grow by one per token, so the
two agree in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TokenInfo:
    """What the masks need to know about each token. All `[B, T]` long tensors."""

    pos: Tensor  # position inside its document
    doc: Tensor  # document id, increasing along the row
    block: Tensor  # image block id (>0) or 0 for text; unique inside a row

    def cat(self, other: TokenInfo) -> TokenInfo:
        return TokenInfo(
            torch.cat([self.pos, other.pos], 1),
            torch.cat([self.doc, other.doc], 1),
            torch.cat([self.block, other.block], 1),
        )

    def last(self, n: int) -> TokenInfo:
        return TokenInfo(self.pos[:, -n:], self.doc[:, -n:], self.block[:, -n:])

    def span(self, a: int, b: int) -> TokenInfo:
        """Tokens a to b - 1 of every row (context parallelism: a shard, with its halo)."""
        return TokenInfo(self.pos[:, a:b], self.doc[:, a:b], self.block[:, a:b])


def token_info(input_ids: Tensor, position_ids: Tensor, image_token_id: int | None) -> TokenInfo:
    """Document and image-block ids for every token of `[B, T]` rows."""
    b, t = input_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)  # [B, T]
    starts[:, 1:] = position_ids[:, 1:] <= position_ids[:, :-1]
    doc = starts.long().cumsum(1)  # [B, T], 1-based
    if image_token_id is None:
        block = torch.zeros_like(input_ids)
    else:
        is_img = input_ids == image_token_id
        prev = torch.zeros_like(is_img)
        prev[:, 1:] = is_img[:, :-1] & ~starts[:, 1:]  # a block never spans two documents
        block = (is_img & ~prev).long().cumsum(1) * is_img  # [B, T]
    return TokenInfo(position_ids.long(), doc, block)


def visible(q: TokenInfo, k: TokenInfo, window: int | None) -> Tensor:
    """Dense boolean mask `[B, Tq, Tk]`: True where query i may attend to key j."""
    qp, kp = q.pos[:, :, None], k.pos[:, None, :]
    same_doc = q.doc[:, :, None] == k.doc[:, None, :]
    same_image = (q.block[:, :, None] == k.block[:, None, :]) & (q.block[:, :, None] > 0)
    allowed = same_doc & ((kp <= qp) | same_image)
    if window is not None:
        allowed = allowed & (qp - kp < window)
    return allowed


_DOC_STRIDE = 1 << 32  # flex_block_mask's token key: doc * stride + pos, for pos < 2**31
_NO_WINDOW = 1 << 31  # a window no position difference inside a document reaches


def flex_block_mask(info: TokenInfo, window: int | None, images: bool = True):
    """The same rule as `visible`, as a FlexAttention BlockMask (block-sparse on GPU).

    The mask_mod runs for every (query, key) pair of every partly masked tile, inside the
    attention kernels too, so each token's document and position are packed into one key,
    `doc * 2**32 + pos`, and read once per side. For positions in [0, 2**31), with
    d = key_q - key_k: same document, causal and in the window is exactly 0 <= d < window (in
    another document, |d| > 2**31). `images=False` (a text-only model: `block` is all zero)
    drops the image term, leaving one load per side; with images, the block ids add one each
    (an image block never spans two documents, so the same block implies the same document).
    """
    key = info.doc * _DOC_STRIDE + info.pos  # [B, T]
    block = info.block
    limit = _NO_WINDOW if window is None else min(window, _NO_WINDOW)

    def text_mask(b, h, q_idx, kv_idx):
        d = key[b, q_idx] - key[b, kv_idx]
        return (d >= 0) & (d < limit)

    def image_mask(b, h, q_idx, kv_idx):
        d = key[b, q_idx] - key[b, kv_idx]
        bq = block[b, q_idx]
        same_image = (bq == block[b, kv_idx]) & (bq > 0)
        return (d < limit) & ((d >= 0) | same_image)

    bsz, t = key.shape
    build = block_mask_builder(key.device)
    return build(image_mask if images else text_mask, bsz, None, t, t, device=key.device)


_COMPILED_BUILDER = None


def block_mask_builder(device: torch.device):
    """`create_block_mask`, compiled once per process on CUDA (eager, it materialises the dense
    `[B, T, T]` mask; torch's `_compile=True` is deprecated and wraps a new compiled function at
    every call). Eager elsewhere, and inside a compiled region, which traces it anyway."""
    global _COMPILED_BUILDER
    from torch.nn.attention.flex_attention import create_block_mask

    if device.type != "cuda" or torch.compiler.is_compiling():
        return create_block_mask
    if _COMPILED_BUILDER is None:
        _COMPILED_BUILDER = torch.compile(create_block_mask)
    return _COMPILED_BUILDER
