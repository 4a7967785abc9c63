"""Distillation loss (model/loss.py): chunked values and gradients against a dense reference
written the obvious way, the sampled estimator's expectation, and alpha = 0 = SFT exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemma3_tune.model import loss as loss_mod
from gemma3_tune.model.loss import (
    SoftTargets,
    TeacherDistribution,
    chunked_distillation,
    teacher_targets,
)


def dense_reference(h, w, labels, soft: SoftTargets):
    """(loss, kd, ce) on full logits: the target distribution written out as a [N, V] matrix."""
    keep = labels != -100
    logits = h[keep] @ w.T  # [N, V]
    n, v = logits.shape
    q = torch.zeros(n, v, dtype=logits.dtype)
    q.index_put_((soft.token, soft.ids), soft.weights.to(logits.dtype), accumulate=True)
    t = soft.temperature
    kd = -(q * F.log_softmax(logits / t, dim=-1)).sum(-1).mean() * t * t
    ce = F.cross_entropy(logits, labels[keep])
    return soft.alpha * kd + (1 - soft.alpha) * ce, kd, ce


def _problem(seed: int, n=70, d=24, v=1000):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).requires_grad_(True)
    w = (torch.randn(v, d, generator=g) * 0.3).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    teacher_h = torch.randn(n, d, generator=g)
    teacher_w = torch.randn(v, d, generator=g) * 0.5
    return h, w, labels, teacher_h, teacher_w


@pytest.mark.parametrize("mode", ["sampled", "topk"])
@pytest.mark.parametrize("alpha,temperature", [(1.0, 1.0), (0.5, 1.0), (0.7, 2.0)])
def test_loss_and_gradients_equal_dense_reference(monkeypatch, mode, alpha, temperature):
    """Chunks of 16 tokens (several per call, entries split across them), fp32, <= 1e-5."""
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", 16 * 1000)
    monkeypatch.setattr(loss_mod, "_CHUNK_MULTIPLE", 1)  # rows exactly as set
    h, w, labels, th, tw = _problem(0)
    keep = labels != -100
    g = torch.Generator().manual_seed(1)
    ids, wt, tok = teacher_targets(th[keep], tw, 32, mode, temperature, g)
    soft = SoftTargets(ids, wt, tok, alpha=alpha, temperature=temperature)
    got = chunked_distillation(h, w, labels, soft)
    want = dense_reference(h, w, labels, soft)
    for a, b in zip(got, want, strict=True):
        assert abs(a.item() - b.item()) <= 1e-5
    gh, gw = torch.autograd.grad(got[0], (h, w))
    gh_want, gw_want = torch.autograd.grad(want[0], (h, w))
    assert (gh - gh_want).abs().max().item() <= 1e-5
    assert (gw - gw_want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("alpha,temperature", [(1.0, 1.0), (0.5, 1.0), (0.7, 2.0)])
def test_full_distribution_equals_torch_soft_cross_entropy(monkeypatch, alpha, temperature):
    """TeacherDistribution (the teacher's whole softmax, made chunk by chunk in the loss)
    against torch's own cross-entropy with probability targets on dense logits: loss, kd, ce
    and both gradients, several chunks per call, fp32, <= 1e-5."""
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", 16 * 1000)
    monkeypatch.setattr(loss_mod, "_CHUNK_MULTIPLE", 1)
    h, w, labels, th, tw = _problem(6)
    keep = labels != -100
    soft = TeacherDistribution(th[keep], tw, alpha=alpha, temperature=temperature)
    got = chunked_distillation(h, w, labels, soft)
    logits = h[keep] @ w.T
    p = (th[keep] @ tw.T / temperature).softmax(-1)
    kd = F.cross_entropy(logits / temperature, p) * temperature**2
    ce = F.cross_entropy(logits, labels[keep])
    want = (alpha * kd + (1 - alpha) * ce, kd, ce)
    for a, b in zip(got, want, strict=True):
        assert abs(a.item() - b.item()) <= 1e-5
    grads = torch.autograd.grad(got[0], (h, w)), torch.autograd.grad(want[0], (h, w))
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max().item() <= 1e-5


def test_teacher_targets_against_dense_teacher():
    """topk: torch.topk of the dense logits, softmax over them; sampled: weights count / K,
    summing to 1 per token, ids among those with nonzero probability, reproducible per seed."""
    _, _, labels, th, tw = _problem(2)
    logits = th @ tw.T / 1.5
    ids, wt, tok = teacher_targets(th, tw, 8, "topk", 1.5)
    top, idx = logits.topk(8, dim=-1)
    assert torch.equal(ids.view(-1, 8), idx)
    assert torch.allclose(wt.view(-1, 8), top.softmax(-1), atol=1e-6)
    g = torch.Generator().manual_seed(3)
    ids, wt, tok = teacher_targets(th, tw, 64, "sampled", 1.5, g)
    per_token = torch.zeros(len(th)).index_add_(0, tok, wt)
    assert torch.allclose(per_token, torch.ones(len(th)), atol=1e-6)
    assert torch.equal((wt * 64).round(), wt * 64)  # counts / K
    assert bool((tok[1:] >= tok[:-1]).all())  # grouped by token, as SoftTargets requires
    again = teacher_targets(th, tw, 64, "sampled", 1.5, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], ids) and torch.equal(again[1], wt)
    for mode in ("sampled", "topk"):  # a row that scores nothing (a padding row): no entries
        assert [len(x) for x in teacher_targets(th[:0], tw, 8, mode)] == [0, 0, 0]


def _heavy_tail_teacher(v: int):
    """Teacher logits for 3 tokens: half the mass on one id, the other half spread over the
    remaining v - 1 ids (each ~1/2000 at v = 1000: no top-k of 16 sees the tail)."""
    logits = torch.full((3, v), 0.0)
    logits[torch.arange(3), torch.tensor([5, 77, 400])] = torch.log(torch.tensor(v - 1.0))
    return logits  # probs: head 0.5, each tail id 0.5 / (v - 1)


@pytest.mark.slow
def test_sampled_gradient_is_unbiased_topk_is_not():
    """Averaged over 4,000 independent draws of K = 16, the sampled estimator's gradient (in
    the student's hidden states and head) converges to the gradient of the cross-entropy to the
    teacher's full distribution: the largest error is under 2% of the largest gradient entry
    (the expected per-entry spread is about 0.3%). Top-16 is deterministic and biased: it puts
    ~98% of the mass on the head instead of 50%, an error over 30%."""
    v, d = 1000, 1000
    torch.manual_seed(4)
    t_logits = _heavy_tail_teacher(v)
    eye = torch.eye(v)  # teacher hidden = its logits, head = identity
    h = (torch.randn(3, d) * 0.1).requires_grad_(True)
    w = (torch.randn(v, d) * 0.1).requires_grad_(True)
    labels = torch.zeros(3, dtype=torch.long)
    p = t_logits.softmax(-1)
    full = -(p * F.log_softmax(h @ w.T, -1)).sum(-1).mean()
    want = torch.autograd.grad(full, (h, w))
    scale = max(g.abs().max().item() for g in want)

    def grad_for(ids, wt, tok):
        loss = chunked_distillation(h, w, labels, SoftTargets(ids, wt, tok))[0]
        return torch.autograd.grad(loss, (h, w))

    g = torch.Generator().manual_seed(5)
    draws = 4000
    mean = [torch.zeros_like(h), torch.zeros_like(w)]
    for _ in range(draws):
        for m, x in zip(
            mean, grad_for(*teacher_targets(t_logits, eye, 16, "sampled", 1.0, g)), strict=True
        ):
            m += x / draws
    sampled_err = max((m - x).abs().max().item() for m, x in zip(mean, want, strict=True)) / scale
    topk = grad_for(*teacher_targets(t_logits, eye, 16, "topk", 1.0))
    topk_err = max((m - x).abs().max().item() for m, x in zip(topk, want, strict=True)) / scale
    assert sampled_err < 0.02, sampled_err
    assert topk_err > 0.3, topk_err


def test_alpha_zero_equals_sft_exactly(tiny_dir):
    """Through the tiny model: alpha = 0 gives the SFT loss and gradients bit for bit."""
    from gemma3_tune.model.checkpoint import load_model

    model = load_model(tiny_dir, dtype=torch.float32)
    v = model.config.vocab_size
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, v, (2, 40), generator=g)
    labels = ids.clone()
    labels[:, :10] = -100
    n = int((labels[:, 1:] != -100).sum())
    t = torch.randint(0, v, (n * 4,), generator=g)
    soft = SoftTargets(t, torch.full((n * 4,), 0.25), torch.arange(n).repeat_interleave(4), 0.0)

    def run(**kw):
        model.zero_grad()
        out = model(ids, labels=labels, num_items_in_batch=n + 3, **kw)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    sft, sft_grads = run()
    kd, kd_grads = run(soft_targets=soft)
    assert torch.equal(sft.loss, kd.loss)
    assert len(sft_grads) == len(kd_grads)
    assert all(torch.equal(a, b) for a, b in zip(sft_grads, kd_grads, strict=True))
    assert torch.equal(kd.ce_loss, sft.loss)  # the logged CE is the SFT loss, scaled alike


def test_model_distillation_against_dense_logits(tiny_dir):
    """The model's own path (shifted labels, packed positions, scored rows only) against the
    dense reference on its full logits."""
    from gemma3_tune.model.checkpoint import load_model

    model = load_model(tiny_dir, dtype=torch.float32)
    teacher = load_model(tiny_dir, dtype=torch.float32)
    torch.manual_seed(7)
    for p in teacher.parameters():
        p.data += torch.randn_like(p) * 0.05
    v = model.config.vocab_size
    ids = torch.randint(3, v, (2, 30))
    pos = torch.cat([torch.arange(12), torch.arange(18)]).expand(2, 30)  # two documents
    labels = ids.clone()
    labels[:, :4] = -100
    labels[:, 12:15] = -100
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    keep = targets.reshape(-1) != -100
    with torch.no_grad():
        th = teacher(ids, position_ids=pos, hidden_only=True).hidden.reshape(60, -1)[keep]
    tw = teacher.get_output_embeddings().weight
    soft = SoftTargets(
        *teacher_targets(th, tw, 16, "sampled", 1.0, torch.Generator().manual_seed(8)), 0.8
    )
    out = model(ids, position_ids=pos, labels=labels, soft_targets=soft)
    logits = model(ids, position_ids=pos).logits.reshape(60, -1)
    h_eye = torch.eye(v)
    want = dense_reference(logits, h_eye, targets.reshape(-1), soft)
    assert abs(out.loss.item() - want[0].item()) <= 1e-5
    assert abs(out.kd_loss.item() - want[1].item()) <= 1e-5
    assert abs(out.ce_loss.item() - want[2].item()) <= 1e-5
    got = torch.autograd.grad(out.loss, list(model.parameters()))
    ref = torch.autograd.grad(want[0], list(model.parameters()))
    assert max((a - b).abs().max().item() for a, b in zip(got, ref, strict=True)) <= 1e-5
