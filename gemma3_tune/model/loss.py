"""Chunked cross-entropy over the tied LM head, without materialising `[tokens, vocab]` fp32 logits.

Gemma 3's vocabulary has 262,144 entries: for 2,048 tokens the fp32 logits alone are 2 GiB,
and autograd keeps several copies. Here the hidden states are projected and scored a chunk of
tokens at a time. The gradient of each chunk is computed in the same pass (softmax minus
one-hot), so backward only has to scale the stored gradients: nothing is recomputed and no
chunk's logits outlive its loop iteration.

Precision: the softmax and its gradient are fp32 (fp64 when given fp64). The matmuls take
their operands in the weights' dtype and accumulate in fp32: in bf16 they run on tensor cores
(with TF32 off, an fp32 matmul of the same size is several times slower), and the gradient of
the weight is summed over chunks in fp32. The loop never reads a tensor value on the host, so
on a GPU it queues all chunks without waiting for any.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 1 << 26  # 64M fp32 logits (256 MiB) per chunk


def _chunk_rows(vocab: int) -> int:
    return max(16, _CHUNK_ELEMENTS // vocab)


def _mm(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """`a @ b` returned in `acc`, with `a` and `b` in their own (equal) dtype.

    For fp32/fp64 operands this is the plain matmul. For bf16/fp16 ones the kernel multiplies
    in that dtype and accumulates in fp32 (cuBLAS and oneDNN both do). On CUDA,
    `torch.mm(..., out_dtype=torch.float32)` (torch >= 2.8, CUDA only) also writes the result
    in fp32; elsewhere the result is rounded once to the operands' dtype and then widened,
    which stays within bf16 tolerance.
    """
    if a.dtype == acc:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=acc)
        except (RuntimeError, TypeError):  # no mm.dtype kernel in this build: round once
            pass
    return (a @ b).to(acc)


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, need_h: bool, need_w: bool):
        # hidden: [N, D]; weight: [V, D]; targets: [N], every one a real token id (N >= 1):
        # chunked_cross_entropy has already dropped the ignored rows.
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 when given fp64
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        step = _chunk_rows(weight.shape[0])
        for s in range(0, n, step):
            h, tgt = hidden[s : s + step], targets[s : s + step]  # [c, D], [c]
            logits = _mm(h, weight.T, acc)  # [c, V]
            picked = logits.gather(1, tgt[:, None])[:, 0]  # [c]
            # log-sum-exp in place (no [c, V] temporaries: torch.logsumexp allocates two, and
            # at this size the page faults cost more than the arithmetic).
            peak = logits.amax(dim=-1, keepdim=True)  # [c, 1]
            probs = logits.sub_(peak).exp_()  # unnormalised softmax  [c, V]
            z = probs.sum(dim=-1)  # [c]
            lse = peak[:, 0] + z.log()
            total += (lse - picked).sum()
            if need_h or need_w:
                # d(mean loss) / d(logits) = (softmax - one_hot) / n, in one pass
                probs.mul_((1.0 / n / z)[:, None])
                probs[torch.arange(len(tgt), device=h.device), tgt] -= 1.0 / n
                g = probs.to(weight.dtype)  # [c, V]: the matmuls' operands in the weights' dtype
                if need_h:
                    grad_h[s : s + step] = (g @ weight).to(hidden.dtype)  # [c, D]
                if need_w:
                    grad_w += _mm(g.T, h.to(weight.dtype), acc)  # [V, D], summed in fp32
                del g
            del logits, probs
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0),
            grad_w if grad_w is not None else torch.empty(0),
        )
        ctx.need = (need_h, need_w)
        ctx.w_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w = ctx.need
        gh = grad_h * grad_out.to(grad_h.dtype) if need_h else None
        gw = (grad_w * grad_out).to(ctx.w_dtype) if need_w else None
        return gh, gw, None, None, None


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, over non-ignored targets.

    hidden: `[N, D]`, weight: `[V, D]`, targets: `[N]`. Equal (values and gradients) to
    `F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)`, except that a
    batch with no valid target gives 0 rather than NaN. With bf16 inputs the matmuls run in
    bf16 with fp32 accumulation, so results match that fp32 reference to bf16 tolerance.

    Only rows with a target are projected: in chat SFT most tokens are prompt, and the
    262k-vocabulary head is the largest matmul of a small Gemma, so this alone halves its cost.
    Finding those rows is the one host sync of a call (`nonzero`); the chunk loop has none.
    """
    need_h = torch.is_grad_enabled() and hidden.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    keep = (targets != IGNORE_INDEX).nonzero()[:, 0]
    if keep.numel() == 0:
        return (hidden.sum() * 0.0).float()  # no target: zero loss, zero gradients, graph intact
    return _ChunkedCE.apply(hidden.index_select(0, keep), weight, targets[keep], need_h, need_w)
