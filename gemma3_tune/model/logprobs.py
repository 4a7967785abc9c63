"""Log-probabilities of chosen tokens, per token and summed per packed document, without
materialising `[tokens, vocab]` fp32 logits: what preference tuning scores whole replies by.

`chunked_logprobs` gives log p(target) per token and `document_logprobs` sums them per packed
document, by the same chunked projection of the tied LM head as the cross-entropy in loss.py
(its chunk size, head cast, autocast and matmul precision rules: see that module).
`sequence_logprobs` is what `Gemma3.forward(..., sequence_logps=True)` returns: per document
of a packed batch, with the targets that cross a document boundary dropped.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .loss import IGNORE_INDEX, _add_mm, _autocast_off, _chunk_rows, _head, _mm, _scored


class _ChunkedLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[i, targets[i]] per row, a chunk of rows at a time.

    d logp_i / d z_i = onehot(y_i) - softmax(z_i). When only the hidden states need a gradient
    (LoRA: the tied embedding is frozen), d logp_i / d h_i = W[y_i] - softmax(z_i) @ W is
    prepared in the forward pass (one [c, V] @ [V, D] matmul per chunk while its softmax exists),
    and backward only scales its rows by the incoming gradient. When the weight needs one too
    (full fine-tuning), its gradient sums g_i (onehot - softmax)_i h_i^T over rows, which needs
    the incoming g inside the sum: backward recomputes each chunk's softmax (one more [c, D] @
    [D, V] matmul per chunk) rather than keeping [N, V] alive between the passes.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, need_h: bool, need_w: bool):
        prepare = need_h and not need_w
        with _autocast_off(hidden):
            w = _head(weight, hidden)  # [V, D], cast once: backward reuses this copy
            out, grad_h = _logprob_chunks(hidden, w, targets, prepare)
        ctx.need = (need_h, need_w)
        ctx.w_dtype = weight.dtype
        if prepare:
            ctx.save_for_backward(grad_h)
        elif need_w:
            ctx.save_for_backward(hidden, w, targets)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        need_h, need_w = ctx.need
        if not need_w:
            (grad_h,) = ctx.saved_tensors
            return grad_h * grad_out[:, None].to(grad_h.dtype), None, None, None, None
        hidden, w, targets = ctx.saved_tensors
        with _autocast_off(hidden):
            grad_h, grad_w = _logprob_grads(hidden, w, targets, grad_out, need_h)
        return grad_h, grad_w.to(ctx.w_dtype), None, None, None  # fp32 sums, weight's dtype


def _logprob_chunks(
    hidden: Tensor, weight: Tensor, targets: Tensor, prepare: bool
) -> tuple[Tensor, Tensor | None]:
    """_ChunkedLogProbs' forward pass: log p(target) `[N]` in fp32 (fp64 when given fp64) and,
    when `prepare`, d logp_i / d h_i `[N, D]`. hidden: [N, D]; weight: [V, D] in hidden's dtype;
    targets: [N], every one a real token id (N >= 1)."""
    n = hidden.shape[0]
    acc = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.empty(n, dtype=acc, device=hidden.device)
    grad_h = torch.empty_like(hidden) if prepare else None
    step = _chunk_rows(weight.shape[0])
    for s in range(0, n, step):
        h, tgt = hidden[s : s + step], targets[s : s + step]  # [c, D], [c]
        logits = _mm(h, weight.T, acc)  # [c, V]
        picked = logits.gather(1, tgt[:, None])[:, 0]  # [c]
        peak = logits.amax(dim=-1, keepdim=True)  # [c, 1]
        probs = logits.sub_(peak).exp_()  # unnormalised softmax, in place  [c, V]
        z = probs.sum(dim=-1)  # [c]
        out[s : s + step] = picked - peak[:, 0] - z.log()
        if prepare:
            _onehot_minus_softmax(probs, z, tgt)
            grad_h[s : s + step] = probs.to(weight.dtype) @ weight
        del logits, probs
    return out, grad_h


def _logprob_grads(
    hidden: Tensor, weight: Tensor, targets: Tensor, grad_out: Tensor, need_h: bool
) -> tuple[Tensor | None, Tensor]:
    """_ChunkedLogProbs' backward with the weight trained: each chunk's softmax recomputed, and
    (d loss / d hidden `[N, D]` or None, d loss / d weight `[V, D]` summed in fp32). weight: the
    forward's copy in hidden's dtype; grad_out: [N]."""
    acc = grad_out.dtype
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros_like(weight, dtype=acc)
    step = _chunk_rows(weight.shape[0])
    for s in range(0, hidden.shape[0], step):
        h, tgt = hidden[s : s + step], targets[s : s + step]  # [c, D], [c]
        probs = _mm(h, weight.T, acc)  # [c, V], the forward's logits again
        probs.sub_(probs.amax(dim=-1, keepdim=True)).exp_()
        _onehot_minus_softmax(probs, probs.sum(dim=-1), tgt)
        g = probs.mul_(grad_out[s : s + step, None]).to(weight.dtype)  # d loss / d z  [c, V]
        if need_h:
            grad_h[s : s + step] = g @ weight  # [c, D]
        _add_mm(grad_w, g.T, h)  # [V, D], summed in fp32
        del probs, g
    return grad_h, grad_w


def _onehot_minus_softmax(probs: Tensor, z: Tensor, targets: Tensor) -> None:
    """In place: unnormalised softmax `probs` [c, V] (row sums `z` [c]) -> onehot(targets) -
    softmax, the gradient of log p(target) in the logits."""
    probs.mul_((-1.0 / z)[:, None])
    probs[torch.arange(len(targets), device=probs.device), targets] += 1.0


def _scored_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, keep: Tensor) -> Tensor:
    """log p(target) `[K]` of the rows `keep` `[K]` (rows with a target), in chunks."""
    need_h = torch.is_grad_enabled() and hidden.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    h = hidden.index_select(0, keep)
    return _ChunkedLogProbs.apply(h, weight, targets[keep], need_h, need_w)


def chunked_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """log_softmax(hidden @ weight.T)[i, targets[i]] per row `[N]`, 0 where targets == -100.

    hidden: `[N, D]`, weight: `[V, D]`, targets: `[N]`. fp32 (fp64 when given fp64), under the
    same precision rules as chunked_cross_entropy; differentiable in hidden and weight. Only rows
    with a target are projected (finding them is the one host sync), and no more than one chunk
    of `[rows, V]` logits exists at a time.
    """
    acc = torch.promote_types(hidden.dtype, torch.float32)
    keep = _scored(targets, None)
    if keep.numel() == 0:
        return (hidden[:, 0] * 0.0).to(acc)  # zeros, graph intact
    picked = _scored_logprobs(hidden, weight, targets, keep)  # [K]
    return picked.new_zeros(hidden.shape[0]).index_put((keep,), picked)


def document_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, doc: Tensor
) -> tuple[Tensor, Tensor]:
    """Per document, the sum of log p(target) over its targets and their count.

    hidden: `[N, D]`, weight: `[V, D]`, targets: `[N]` (-100: none), doc: `[N]` the document
    each row belongs to, non-decreasing. Returns (logps `[S]` fp32, tokens `[S]` int64) for the
    S documents with at least one target, in order: dense_document_logprobs' sums, the
    documents without a target dropped (no loop over documents).
    """
    documents = int(doc.max()) + 1 if doc.numel() else 0
    logps, tokens = dense_document_logprobs(hidden, weight, targets, doc, documents)
    has = tokens > 0
    return logps[has], tokens[has]


def dense_document_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, doc: Tensor, documents: int
) -> tuple[Tensor, Tensor]:
    """Per document id 0 .. documents - 1, the sum of log p(target) over its targets among
    these rows and their count, 0 for a document without one here: one rank's share of the
    whole rows' documents under context parallelism (the shares add up across the group).
    hidden: `[N, D]`, targets: `[N]`, doc: `[N]` 0-based ids. The log-probs keep the graph
    even with no target here (so every rank's backward reaches the same collectives)."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logps = (hidden.sum() * 0.0).to(acc).expand(documents).clone()  # [S] zeros, graph intact
    tokens = torch.zeros(documents, dtype=torch.long, device=hidden.device)
    keep = _scored(targets, None)  # [K]
    if keep.numel():
        picked = _scored_logprobs(hidden, weight, targets, keep)  # [K]
        logps = logps.index_add(0, doc[keep], picked)
        tokens.index_add_(0, doc[keep], torch.ones_like(keep))
    return logps, tokens


def document_index(doc: Tensor) -> tuple[Tensor, Tensor]:
    """Rows' 1-based document ids `[B, T]` (TokenInfo.doc) -> (where the next token starts a
    document `[B, T]` bool, False in the last column; each token's 0-based document id across
    the batch, row-major `[B, T]`)."""
    starts_next = torch.zeros_like(doc, dtype=torch.bool)
    starts_next[:, :-1] = doc[:, 1:] != doc[:, :-1]
    per_row = doc[:, -1]  # [B]: documents in each row
    return starts_next, doc - 1 + (per_row.cumsum(0) - per_row)[:, None]


def sequence_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, doc: Tensor
) -> tuple[Tensor, Tensor]:
    """Per document of the flattened batch (row-major; a document is what the masks keep
    apart: a run whose positions increase), the sum of log p(target) over its labelled
    targets and their count, for the documents with at least one. A target whose label is
    the first token of the next document is dropped (a prediction across the boundary; the
    data never labels it). hidden: [B, T, D]; targets: [B, T], already shifted (ignored
    targets are written into it); doc: [B, T], 1-based document ids per row (TokenInfo.doc)."""
    b, t = targets.shape
    starts_next, ids = document_index(doc)
    targets.masked_fill_(starts_next, IGNORE_INDEX)
    return document_logprobs(
        hidden.reshape(b * t, -1), weight, targets.reshape(-1), ids.reshape(-1)
    )
