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


def flex_block_mask(info: TokenInfo, window: int | None):
    """The same rule as `visible`, as a FlexAttention BlockMask (block-sparse on GPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    pos, doc, block = info.pos, info.doc, info.block

    def mask_mod(b, h, q_idx, kv_idx):
        same_doc = doc[b, q_idx] == doc[b, kv_idx]
        causal = pos[b, kv_idx] <= pos[b, q_idx]
        same_image = (block[b, q_idx] == block[b, kv_idx]) & (block[b, q_idx] > 0)
        allowed = same_doc & (causal | same_image)
        if window is not None:
            allowed = allowed & (pos[b, q_idx] - pos[b, kv_idx] < window)
        return allowed

    bsz, t = pos.shape
    # Compiled on CUDA: eager create_block_mask materialises the dense [B, T, T] mask.
    return create_block_mask(mask_mod, bsz, None, t, t, device=pos.device, _compile=pos.is_cuda)
