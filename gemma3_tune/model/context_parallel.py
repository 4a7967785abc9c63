"""Context parallelism the Gemma 3 way: a packed row cut into N consecutive shards, one per rank
of a group, and each layer type sent only the keys it needs.

- Sliding layers (5 of every 6) look back `W - 1` positions, so a shard's queries need only the
  last `W - 1` keys and values of the previous shard: each rank sends those (the halo) to the
  next rank and prepends what the previous one sent; in backward the halo's gradients go back
  the same way. Nothing else moves for them.
- Global layers: keys and values all-gathered along the sequence (GQA keeps them small: one KV
  head at 270M/1B), their gradients summed back to the rank that owns each key
  (reduce-scatter; all-reduce and a slice where the backend has no reduce-scatter, as gloo).
- Masks: positions, documents and image blocks are the whole row's. Each rank all-gathers the
  row's `input_ids` and `position_ids` once per forward (integers, T per row) and derives the
  row's TokenInfo, so a document or a window that crosses a shard boundary is masked as in
  one process.

Shards may differ in length (a boundary moves so that no image block is cut; train/ chooses
them); the collectives pad to the longest shard and trim. A halo comes from one neighbour, so
it needs shards of at least `W - 1` tokens; in a shorter row (train/ refuses rows that are
short by design; a batch at the end of the data may be) sliding layers all-gather instead.

`ContextGroup.sent` counts the bytes this rank sends, per layer type: the halo's tail and, in
backward, its gradient; for an all-gather and a reduce-scatter, (N - 1) shards each (what a
ring sends; the lower bound for any algorithm that leaves the whole result on every rank).

Shapes: B batch, Ts this shard's tokens, T the row's, K kv heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .loss import IGNORE_INDEX
from .masks import TokenInfo, token_info, visible

SLIDING, GLOBAL = "sliding_attention", "full_attention"


@dataclass
class ContextGroup:
    """This process's place in a context-parallel group of `size` ranks."""

    group: object  # a torch.distributed ProcessGroup (None: the default group)
    rank: int  # index in the group: which shard of the row this process holds
    size: int
    sent: dict[str, int] = field(default_factory=dict)  # bytes sent, per kind, since reset

    def peer(self, index: int) -> int:
        """The global rank of the group's `index`-th member (P2P takes global ranks)."""
        return dist.get_global_rank(self.group, index) if self.group is not None else index

    def count(self, kind: str, nbytes: int) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + int(nbytes)

    @classmethod
    def of(cls, group=None) -> ContextGroup:
        return cls(group, dist.get_rank(group), dist.get_world_size(group))


def _bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _gather_seq(x: Tensor, cg: ContextGroup, lengths: list[int], dim: int) -> Tensor:
    """All shards of `x` along `dim`, in group order (each padded to the longest, then trimmed)."""
    x = _pad_to(x, max(lengths), dim)
    parts = [torch.empty_like(x) for _ in range(cg.size)]
    dist.all_gather(parts, x.contiguous(), group=cg.group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, lengths, strict=True)], dim)


class _AllGatherSeq(torch.autograd.Function):
    """kv [2, B, K, Ts, Dh] -> [2, B, K, T, Dh]; backward: each key's gradient summed over the
    ranks whose queries saw it, returned to its owner."""

    @staticmethod
    def forward(ctx, kv: Tensor, cg: ContextGroup, lengths: list[int], kind: str) -> Tensor:
        ctx.cg, ctx.lengths, ctx.kind = cg, lengths, kind
        cg.count(kind, _bytes(kv) * (cg.size - 1))
        return _gather_seq(kv, cg, lengths, dim=3)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cg, lengths = ctx.cg, ctx.lengths
        start = sum(lengths[: cg.rank])
        mine = lengths[cg.rank]
        if dist.get_backend(cg.group) == "gloo":  # no reduce-scatter: all-reduce, keep ours
            grad = grad.contiguous()
            dist.all_reduce(grad, group=cg.group)
            out = grad.narrow(3, start, mine).contiguous()
        else:  # NCCL (not run here: the tests use gloo)
            parts = [_pad_to(p, max(lengths), 3).contiguous() for p in grad.split(lengths, dim=3)]
            out = torch.empty_like(parts[0])
            dist.reduce_scatter(out, parts, group=cg.group)
            out = out.narrow(3, 0, mine)
        cg.count(ctx.kind, _bytes(out) * (cg.size - 1))
        return out, None, None, None


def _pad_to(x: Tensor, n: int, dim: int) -> Tensor:
    """`x` with zeros appended along `dim` up to length n (collectives take equal shapes)."""
    pad = n - x.shape[dim]
    if not pad:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:dim], pad, *x.shape[dim + 1 :])], dim)


def _p2p(send: Tensor | None, to: int | None, recv: Tensor | None, frm: int | None, group):
    """Send `send` to global rank `to` and receive into `recv` from `frm`, both at once (either
    may be None): posted together, neighbours exchanging both ways cannot deadlock."""
    ops = []
    if send is not None and to is not None:
        ops.append(dist.P2POp(dist.isend, send.contiguous(), to, group))
    if recv is not None and frm is not None:
        ops.append(dist.P2POp(dist.irecv, recv, frm, group))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


class _Halo(torch.autograd.Function):
    """tail [2, B, K, h, Dh] (the last h keys and values of this shard) -> the previous
    shard's tail (h = 0 on the first rank), sent on to the next rank. Backward: the gradient of
    what was received goes back to the previous rank, and the next rank's gradient of our tail
    comes back (zero on the last rank, whose tail no one saw)."""

    @staticmethod
    def forward(ctx, tail: Tensor, cg: ContextGroup) -> Tensor:
        ctx.cg, ctx.tail_shape = cg, tail.shape
        first, last = cg.rank == 0, cg.rank == cg.size - 1
        halo = tail.new_empty((*tail.shape[:3], 0 if first else tail.shape[3], tail.shape[4]))
        _p2p(
            None if last else tail, None if last else cg.peer(cg.rank + 1),
            None if first else halo, None if first else cg.peer(cg.rank - 1),
            cg.group,
        )  # fmt: skip
        if not last:
            cg.count(SLIDING, _bytes(tail))
        return halo

    @staticmethod
    def backward(ctx, grad: Tensor):
        cg = ctx.cg
        first, last = cg.rank == 0, cg.rank == cg.size - 1
        back = grad.new_zeros(ctx.tail_shape)
        _p2p(
            None if first else grad, None if first else cg.peer(cg.rank - 1),
            None if last else back, None if last else cg.peer(cg.rank + 1),
            cg.group,
        )  # fmt: skip
        if not first:
            cg.count(SLIDING, _bytes(grad))
        return back, None


@dataclass
class ContextMask:
    """What an attention layer of one type needs under context parallelism: the keys and values
    it attends to (this shard's, extended by the exchange), and the dense mask over them."""

    dense: Tensor  # [B, 1, Ts, S] bool
    shard: RowShard
    layer_type: str
    halo: int  # sliding layers: keys received from the previous shard

    def keys_values(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v [B, K, Ts, Dh] -> [B, K, S, Dh]: with the halo prepended, or the whole row's."""
        cg = self.shard.group
        if self.layer_type == GLOBAL or not self.shard.halos:
            kind = self.layer_type  # a sliding layer of a short row gathers (and counts) too
            kv = _AllGatherSeq.apply(torch.stack([k, v]), cg, self.shard.lengths, kind)
            if self.layer_type != GLOBAL:  # the keys its window reaches: [start - halo, end)
                kv = kv.narrow(3, self.shard.start - self.halo, self.halo + k.shape[2])
            return kv[0], kv[1]
        h = self.shard.window - 1
        halo = _Halo.apply(torch.stack([k[:, :, -h:], v[:, :, -h:]]), cg)  # [2, B, K, h', Dh]
        return torch.cat([halo[0], k], 2), torch.cat([halo[1], v], 2)


@dataclass
class RowShard:
    """This rank's shard of the batch's rows, and the whole rows' token information."""

    group: ContextGroup
    row: TokenInfo  # [B, T]: the whole rows
    lengths: list[int]  # every shard's length, in group order
    window: int  # the sliding window W

    @property
    def halos(self) -> bool:
        """Whether every shard holds a whole halo (W - 1 tokens): else, in a row shorter than
        the group's n x (W - 1) tokens (a short last batch), sliding layers all-gather too."""
        return min(self.lengths) >= self.window - 1

    @property
    def start(self) -> int:
        return sum(self.lengths[: self.group.rank])

    @property
    def local(self) -> TokenInfo:
        a = self.start
        return self.row.span(a, a + self.lengths[self.group.rank])

    def mask(self, layer_type: str) -> ContextMask:
        """The dense mask of this shard's queries over the keys its layers of `layer_type` get."""
        q = self.local
        if layer_type == GLOBAL:
            return ContextMask(visible(q, self.row, None)[:, None], self, layer_type, 0)
        a = self.start
        halo = min(self.window - 1, a)  # the first shard receives none
        keys = self.row.span(a - halo, a + self.lengths[self.group.rank])
        return ContextMask(visible(q, keys, self.window)[:, None], self, layer_type, halo)


def shard_rows(
    cg: ContextGroup, input_ids: Tensor, position_ids: Tensor, image_token_id: int | None,
    window: int,
) -> RowShard:  # fmt: skip
    """The whole rows' TokenInfo from every rank's shard of `input_ids` and `position_ids`
    ([B, Ts] each): two all-gathers of integers (and one of the shard lengths)."""
    mine = torch.tensor([input_ids.shape[1]], device=input_ids.device)
    sizes = [torch.empty_like(mine) for _ in range(cg.size)]
    dist.all_gather(sizes, mine, group=cg.group)
    lengths = [int(x) for x in sizes]
    ids = _gather_seq(input_ids, cg, lengths, dim=1)  # [B, T]
    pos = _gather_seq(position_ids, cg, lengths, dim=1)
    cg.count("row ids", (_bytes(input_ids) + _bytes(position_ids)) * (cg.size - 1))
    return RowShard(cg, token_info(ids, pos, image_token_id), lengths, window)


def sequence_logprobs_sharded(
    shard: RowShard, hidden: Tensor, weight: Tensor, targets: Tensor
) -> tuple[Tensor, Tensor]:
    """Preference tuning's per-document log-probs (model/logprobs.py `sequence_logprobs`) of
    the whole rows, from this rank's shard: its share of every document's sum, all-reduced in
    the group. The sum's backward all-reduces too: every rank computes the same loss from the
    sums, so each shard's gradient arrives N times, which data parallelism's average over the
    group's N ranks divides back. hidden: [B, Ts, D]; targets: [B, Ts], shifted on the row."""
    from torch.distributed.nn.functional import all_reduce

    from .logprobs import dense_document_logprobs, document_index

    a = shard.start
    z = a + shard.lengths[shard.group.rank]
    starts_next, ids = document_index(shard.row.doc)  # the whole rows', [B, T]
    targets = targets.masked_fill(starts_next[:, a:z], IGNORE_INDEX)
    b, ts = targets.shape
    logps, tokens = dense_document_logprobs(
        hidden.reshape(b * ts, -1), weight, targets.reshape(-1), ids[:, a:z].reshape(-1),
        int(shard.row.doc[:, -1].sum()),
    )  # fmt: skip
    logps = all_reduce(logps, group=shard.group.group or dist.group.WORLD)
    dist.all_reduce(tokens, group=shard.group.group)
    has = tokens > 0
    return logps[has], tokens[has]


def traffic(c, row: int, n: int, dtype_bytes: int = 2, rows: int = 1) -> dict[str, dict[str, int]]:
    """Bytes one rank sends in a training step (forward and backward) on `rows` rows of `row`
    tokens over `n` ranks, per layer type (all layers of that type together): this scheme
    (a middle rank, as `ContextGroup.sent` counts them), ring attention and Ulysses, computed.

    - ours: sliding layers send the halo forward and its gradient back, 2 (W - 1) tokens of K
      and V; global layers all-gather K and V and reduce-scatter their gradients, 2 (n - 1)
      shards;
    - ring attention, every layer: K and V go round the ring in forward ((n - 1) shards), and
      again in backward with their gradients (2 (n - 1) shards);
    - Ulysses, every layer: all-to-alls of Q, K, V in and of the output back, forward and
      backward: 2 (n - 1) / n shards of (2 H + 2 K) Dh values per token.
    """
    kv = 2 * c.num_key_value_heads * c.head_dim * dtype_bytes * rows  # one token's K and V
    qo = 2 * c.num_attention_heads * c.head_dim * dtype_bytes * rows  # its Q and attention output
    shard = row // n
    layers = {
        SLIDING: sum(t != GLOBAL for t in c.layer_types),
        GLOBAL: sum(t == GLOBAL for t in c.layer_types),
    }
    ours = {
        SLIDING: layers[SLIDING] * 2 * (c.sliding_window - 1) * kv,
        GLOBAL: layers[GLOBAL] * 2 * (n - 1) * shard * kv,
    }
    ring = {t: k * 3 * (n - 1) * shard * kv for t, k in layers.items()}
    ulysses = {t: k * 2 * (n - 1) * shard * (kv + qo) // n for t, k in layers.items()}
    return {"ours": ours, "ring": ring, "ulysses": ulysses}
