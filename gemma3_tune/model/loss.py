"""Chunked cross-entropy over the tied LM head, without materialising `[tokens, vocab]` fp32 logits.

Gemma 3's vocabulary has 262,144 entries: for 2,048 tokens the fp32 logits alone are 2 GiB,
and autograd keeps several copies. Here the hidden states are projected and scored a chunk of
tokens at a time. The gradient of each chunk is computed in the same pass (softmax minus
one-hot), so backward only has to scale the stored gradients: nothing is recomputed and no
chunk's logits outlive its loop iteration.

Precision: the softmax and its gradient are fp32 (fp64 when given fp64). The matmuls take
their operands in the hidden states' dtype and accumulate in fp32: in bf16 they run on tensor
cores (with TF32 off, an fp32 matmul of the same size is several times slower), and the gradient
of the weight is summed over chunks in fp32 and returned in the weight's own dtype. A full
fine-tune under autocast hands in an fp32 master head with bf16 hidden states: the head is cast
to bf16 once per call (`_head`), and autocast is off inside the chunk loops, which choose every
dtype themselves (left on, it would cast all of `[V, D]` again for each matmul of each chunk).
The loop never reads a tensor value on the host, so on a GPU it queues all chunks without
waiting for any; the rows with a target are found once per call (`_scored`), or given by the
collator, which found them on the CPU.

Preference tuning scores whole replies instead, by the same chunked projection: logprobs.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 1 << 26  # 64M fp32 logits (256 MiB) per chunk
_CHUNK_MULTIPLE = 64  # rows per chunk are a multiple of this (a GEMM tile's rows)


def _chunk_rows(vocab: int) -> int:
    """Rows per chunk: as many as keep a chunk's logits within _CHUNK_ELEMENTS, rounded down to a
    multiple of 64 (at least 64), so the matmuls' tiles are full: 4B's 262,208-entry vocabulary
    would otherwise give 255 rows, and every chunk a last, mostly empty tile."""
    rows = _CHUNK_ELEMENTS // vocab
    return max(_CHUNK_MULTIPLE, rows - rows % _CHUNK_MULTIPLE)


def _head(weight: Tensor, hidden: Tensor) -> Tensor:
    """The head `[V, D]` in the hidden states' dtype, made once per call (a no-op when they
    agree). Under autocast a full fine-tune's tied weight is an fp32 master and the hidden
    states bf16: mixed operands have no matmul kernel, and a cast inside the chunk loop would
    copy all of `[V, D]` again for every matmul of every chunk (V = 262,144)."""
    return weight.to(hidden.dtype)


def _autocast_off(t: Tensor):
    """A context without autocast on `t`'s device: the chunk loops pick every dtype themselves."""
    kind = t.device.type
    if not torch.amp.is_autocast_available(kind):
        return contextlib.nullcontext()
    return torch.autocast(kind, enabled=False)


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


def _add_mm(out: Tensor, a: Tensor, b: Tensor) -> None:
    """`out += a @ b` for the weight's gradient: `out` `[V, D]` in the accumulation dtype, a and b
    in the compute dtype. On CUDA the product is written in fp32 (`_mm`); elsewhere the add
    widens the once-rounded product as it goes, with no widened `[V, D]` copy per chunk."""
    out += _mm(a, b, out.dtype) if a.is_cuda else a @ b


@dataclass
class SoftTargets:
    """A teacher's target distribution for each scored token, over a few vocabulary ids.

    Stored flat, one entry per (token, id) pair, grouped by token (CSR without the offsets):
    `token[e]` is the index, among the scored tokens of the batch (the non-ignored targets in
    row-major order), that entry `e` belongs to, non-decreasing. Per token the weights sum to 1.
    distill.py makes them (sampled or top-k) from a teacher's logits, in the step or from the
    teacher cache.
    """

    ids: Tensor  # [E] int64: vocabulary ids
    weights: Tensor  # [E] fp32: target probabilities
    token: Tensor  # [E] int64: scored-token index, non-decreasing
    alpha: float = 1.0  # weight of the distillation term; 1 - alpha on the labels' CE
    temperature: float = 1.0  # the student's softmax for the distillation term is of z / T


@dataclass
class TeacherDistribution:
    """A teacher's whole distribution for each scored token, given as what makes it: the
    teacher's final hidden state at each scored token and its head. The probabilities are made a
    chunk of tokens at a time inside the loss, never stored (262,144 per token). The exact
    gradient `softmax(z) - p` instead of the sampled estimate `softmax(z) - w`: when the student
    is close to the teacher (QAT), the difference is smaller than 256 draws resolve."""

    hidden: Tensor  # [K, D]: the teacher's hidden state at each scored token, in order
    weight: Tensor  # [V, D]: the teacher's head (its tied embedding)
    alpha: float = 1.0
    temperature: float = 1.0


class _SparseChunk:
    """A chunk's SoftTargets entries: rows `stok` of the chunk, ids `sid`, weights `sw`."""

    def __init__(self, soft: SoftTargets, e0: int, e1: int, s: int, acc: torch.dtype):
        self.sid, self.sw = soft.ids[e0:e1], soft.weights[e0:e1].to(acc)  # [e], [e]
        self.stok = soft.token[e0:e1] - s  # [e]: row of the chunk

    def dot(self, z: Tensor) -> Tensor:
        """[c]: sum over a token's targets of w * z (z: the raw logits [c, V])."""
        out = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        return out.index_add_(0, self.stok, self.sw * z[self.stok, self.sid])

    def subtract(self, g: Tensor, scale: float) -> None:
        g.index_put_((self.stok, self.sid), self.sw * -scale, accumulate=True)


class _DenseChunk:
    """A chunk's rows of a TeacherDistribution: p = softmax(teacher logits / T), [c, V]."""

    def __init__(self, hidden: Tensor, weight: Tensor, temperature: float, acc: torch.dtype):
        p = _mm(hidden, weight.T, acc)  # [c, V]
        if temperature != 1.0:
            p /= temperature
        p.sub_(p.amax(dim=-1, keepdim=True)).exp_()
        self.p = p.div_(p.sum(dim=-1, keepdim=True))

    def dot(self, z: Tensor) -> Tensor:
        return (self.p[:, None, :] @ z[:, :, None])[:, 0, 0]  # [c], no [c, V] temporary

    def subtract(self, g: Tensor, scale: float) -> None:
        g.sub_(self.p, alpha=scale)


def _chunk_target(soft, bounds, k: int, s: int, c: int, acc: torch.dtype, teacher_head):
    if isinstance(soft, TeacherDistribution):
        return _DenseChunk(soft.hidden[s : s + c], teacher_head, soft.temperature, acc)
    return _SparseChunk(soft, bounds[k], bounds[k + 1], s, acc)


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        need_h: bool,
        need_w: bool,
        soft: SoftTargets | TeacherDistribution | None,
        bounds: list[int] | None,
    ):
        with _autocast_off(hidden):
            loss, kd, ce, grad_h, grad_w = _ce_chunks(
                hidden, _head(weight, hidden), targets, need_h, need_w, soft, bounds
            )
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0),
            grad_w if grad_w is not None else torch.empty(0),
        )
        ctx.need = (need_h, need_w)
        ctx.w_dtype = weight.dtype
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_out: Tensor, _kd: Tensor, _ce: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w = ctx.need
        gh = grad_h * grad_out.to(grad_h.dtype) if need_h else None
        gw = (grad_w * grad_out).to(ctx.w_dtype) if need_w else None  # fp32 sums, weight's dtype
        return gh, gw, None, None, None, None, None


def _ce_chunks(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    need_h: bool,
    need_w: bool,
    soft: SoftTargets | TeacherDistribution | None,
    bounds: list[int] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """_ChunkedCE's forward pass: (loss, kd_loss, ce_loss, d loss / d hidden, d loss / d weight
    in fp32), the gradients for an upstream gradient of 1.

    hidden: [N, D]; weight: [V, D] in hidden's dtype (`_head`); targets: [N], every one a real
    token id (N >= 1): chunked_cross_entropy has already dropped the ignored rows. With soft
    targets, bounds[k]:bounds[k + 1] are the entries of the k-th chunk of tokens."""
    n = hidden.shape[0]
    acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 when given fp64
    ce_sum = torch.zeros((), dtype=acc, device=hidden.device)
    kd_sum = torch.zeros((), dtype=acc, device=hidden.device)
    alpha = soft.alpha if soft is not None else 0.0
    temp = soft.temperature if soft is not None else 1.0
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
    step = _chunk_rows(weight.shape[0])
    dense = isinstance(soft, TeacherDistribution)
    teacher_head = _head(soft.weight, soft.hidden) if dense else None
    for k, s in enumerate(range(0, n, step)):
        h, tgt = hidden[s : s + step], targets[s : s + step]  # [c, D], [c]
        c = len(tgt)
        logits = _mm(h, weight.T, acc)  # [c, V]
        picked = logits.gather(1, tgt[:, None])[:, 0]  # [c]
        if soft is not None:
            target = _chunk_target(soft, bounds, k, s, c, acc, teacher_head)
            dot = target.dot(logits)  # [c]: sum over a token's targets of w * z
        if soft is not None and temp != 1.0:
            # the distillation term's own softmax, of z / T (a second [c, V] buffer)
            pt = logits / temp  # [c, V]
            peak_t = pt.amax(dim=-1, keepdim=True)
            pt.sub_(peak_t).exp_()
            z_t = pt.sum(dim=-1)  # [c]
            lse_t = peak_t[:, 0] + z_t.log()
            kd_sum += temp * temp * (lse_t - dot / temp).sum()
        # log-sum-exp in place (no [c, V] temporaries: torch.logsumexp allocates two, and
        # at this size the page faults cost more than the arithmetic).
        peak = logits.amax(dim=-1, keepdim=True)  # [c, 1]
        probs = logits.sub_(peak).exp_()  # unnormalised softmax  [c, V]
        z = probs.sum(dim=-1)  # [c]
        lse = peak[:, 0] + z.log()
        ce_sum += (lse - picked).sum()
        if soft is not None and temp == 1.0:
            kd_sum += (lse - dot).sum()
        if need_h or need_w:
            # d(mean loss) / d(logits), in one pass:
            #   (1 - alpha) (softmax(z) - one_hot) / n + alpha T (softmax(z / T) - w) / n
            # (at T = 1 the two softmax shares add up to one softmax).
            if soft is not None and temp != 1.0:
                probs.mul_(((1.0 - alpha) / n / z)[:, None])
                probs.add_(pt.mul_((alpha * temp / n / z_t)[:, None]))
                del pt
            else:
                probs.mul_((1.0 / n / z)[:, None])
            probs[torch.arange(c, device=h.device), tgt] -= (1.0 - alpha) / n
            if soft is not None and alpha != 0.0:
                target.subtract(probs, alpha * temp / n)
            g = probs.to(weight.dtype)  # [c, V]: the matmuls' operands in the compute dtype
            if need_h:
                grad_h[s : s + step] = g @ weight  # [c, D]
            if need_w:
                _add_mm(grad_w, g.T, h)  # [V, D], summed in fp32
            del g
        del logits, probs
        target = None  # a dense chunk's [c, V] goes before the next is made
    total = ce_sum if soft is None else (1.0 - alpha) * ce_sum + alpha * kd_sum
    return total / n, kd_sum / n, ce_sum / n, grad_h, grad_w


def _scored(targets: Tensor, scored: Tensor | None) -> Tensor:
    """Indices `[K]` of the rows with a target, in order. Found here with `nonzero`, the one
    host sync of a call (on a GPU it stalls the launch queue), unless the caller has them:
    the training collator computes them on the CPU with the batch (`scored`)."""
    if scored is not None:
        return scored.to(targets.device)
    return (targets != IGNORE_INDEX).nonzero()[:, 0]


def chunked_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, scored: Tensor | None = None
) -> Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, over non-ignored targets.

    hidden: `[N, D]`, weight: `[V, D]`, targets: `[N]`. Equal (values and gradients) to
    `F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)`, except that a
    batch with no valid target gives 0 rather than NaN. With bf16 inputs the matmuls run in
    bf16 with fp32 accumulation, so results match that fp32 reference to bf16 tolerance.

    Only rows with a target are projected: in chat SFT most tokens are prompt, and the
    262k-vocabulary head is the largest matmul of a small Gemma, so this alone halves its cost.
    Finding those rows is the one host sync of a call (`nonzero`), none when `scored` `[K]`
    gives them (the indices of `targets != -100`, in order); the chunk loop has none.
    """
    need_h = torch.is_grad_enabled() and hidden.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    keep = _scored(targets, scored)
    if keep.numel() == 0:
        return (hidden.sum() * 0.0).float()  # no target: zero loss, zero gradients, graph intact
    h = hidden.index_select(0, keep)
    return _ChunkedCE.apply(h, weight, targets[keep], need_h, need_w, None, None)[0]


def chunked_distillation(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    soft: SoftTargets | TeacherDistribution,
    scored: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, kd_loss, ce_loss) over the non-ignored targets, in chunks as chunked_cross_entropy:

        kd_loss = mean over tokens of  -T^2 sum_e w_e log softmax(z / T)[id_e]
        ce_loss = mean over tokens of  -log softmax(z)[label]
        loss    = alpha kd_loss + (1 - alpha) ce_loss

    The distillation term is the cross-entropy from the target distribution `w` (zero off its
    ids) to the student's full-vocabulary softmax: the report's loss (section 2.2). Its gradient
    in the logits is `T (softmax(z / T) - w)`, scattered into the chunk's gradient in the same
    pass as the labels' `softmax(z) - one_hot`, so one chunk of `[tokens, vocab]` exists at a
    time (two at T != 1: the distillation term needs its own softmax). At alpha = 0 the result
    is chunked_cross_entropy's, bit for bit (the same operations). A TeacherDistribution puts
    the teacher's whole softmax in place of `w` (its rows: the scored tokens, in order; a third
    `[tokens, vocab]` buffer). Only loss has a gradient; kd_loss and ce_loss are for the logs.
    `scored`: as chunked_cross_entropy's.
    """
    need_h = torch.is_grad_enabled() and hidden.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    keep = _scored(targets, scored)
    if keep.numel() == 0:
        zero = (hidden.sum() * 0.0).float()
        return zero, zero.detach(), zero.detach()
    bounds = None
    if isinstance(soft, SoftTargets):
        n, step = keep.numel(), _chunk_rows(weight.shape[0])
        starts = torch.arange(0, n + step, step, device=soft.token.device).clamp(max=n)
        bounds = torch.searchsorted(soft.token, starts).tolist()  # entries per chunk: one read
    h = hidden.index_select(0, keep)
    return _ChunkedCE.apply(h, weight, targets[keep], need_h, need_w, soft, bounds)


def batch_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    soft_targets: SoftTargets | TeacherDistribution | None,
    num_items_in_batch: int | Tensor | None,
    scored: Tensor | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Gemma3.forward's loss with labels: the mean loss over the shifted `targets` [B, T] != -100
    (of hidden [B, T, D]), in chunks, and what goes in the logs (`kd_loss`, `ce_loss` when
    distilling). Given `num_items_in_batch` (HF Trainer: labelled tokens in the step), this
    micro-batch's sum divided by it instead.

    `scored` `[K]`: the flat indices into `[B * T]` of those targets, in order, when the
    caller has them: the training collator computes them on the CPU (data/collate.py,
    `scored_positions`), which spares the loss its one host sync per step (a `nonzero`)."""
    b, t = targets.shape
    flat = targets.reshape(-1)
    logs = {}
    if soft_targets is None:
        loss = chunked_cross_entropy(hidden.reshape(b * t, -1), weight, flat, scored)
    else:
        loss, kd, ce = chunked_distillation(
            hidden.reshape(b * t, -1), weight, flat, soft_targets, scored
        )
        logs = {"kd_loss": kd, "ce_loss": ce}
    if num_items_in_batch is not None:
        # sum over this micro-batch / labelled tokens in the step
        count = (flat != IGNORE_INDEX).sum() if scored is None else scored.numel()
        share = count / torch.as_tensor(num_items_in_batch, device=loss.device).clamp(min=1)
        loss = loss * share
        logs = {k: v * share for k, v in logs.items()}
    return loss, logs


@torch.no_grad()
def teacher_targets(
    hidden: Tensor,
    weight: Tensor,
    samples: int,
    mode: str = "sampled",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A teacher's targets for each row of `hidden` ([N, D]; weight [V, D]): (ids, weights,
    token) as SoftTargets holds them, a chunk of rows at a time.

    sampled: `samples` draws from softmax(z / T), with replacement; each distinct id drawn gets
    weight count / samples. The expected weight of every id is exactly its teacher probability,
    so the distillation gradient `softmax(student) - w` is an unbiased estimate of the gradient
    of the cross-entropy to the teacher's full distribution, tail included. The report's "set to
    zero probability for non-sampled logits, and renormalized" reads as this empirical
    distribution; renormalising the teacher's own probabilities over a sampled set would bias
    the target towards the ids that are drawn most (the head), which is what sampling avoids.
    topk: the `samples` most probable ids, their probabilities renormalised over them: the
    method of the toolkits that distil today, for comparison (it drops the tail, and biases).
    Entries per token: at most `samples` (sampled, fewer when draws repeat), exactly (topk).
    """
    n, v = hidden.shape[0], weight.shape[0]
    step = _chunk_rows(v)
    none = torch.zeros(0, dtype=torch.long, device=hidden.device)
    ids, weights, token = [none], [none.float()], [none]  # a row with no scored token: empty
    w = _head(weight, hidden)  # [V, D]: cast once, not per chunk
    for s in range(0, n, step):
        with _autocast_off(hidden):
            logits = _mm(hidden[s : s + step], w.T, torch.float32)  # [c, V]
        c = logits.shape[0]
        if temperature != 1.0:
            logits /= temperature
        if mode == "topk":
            top, idx = logits.topk(samples, dim=-1)  # [c, K]
            ids.append(idx.reshape(-1))
            weights.append(top.softmax(dim=-1).reshape(-1))
            token.append(torch.arange(s, s + c, device=logits.device).repeat_interleave(samples))
            continue
        probs = logits.softmax(dim=-1)  # [c, V]
        del logits
        draws = torch.multinomial(probs, samples, replacement=True, generator=generator)  # [c, K]
        del probs
        rows = torch.arange(c, device=draws.device)[:, None]
        pair, count = torch.unique((rows * v + draws).reshape(-1), return_counts=True)  # sorted
        ids.append(pair % v)
        token.append(pair // v + s)
        weights.append(count.float() / samples)
    return torch.cat(ids), torch.cat(weights), torch.cat(token)
