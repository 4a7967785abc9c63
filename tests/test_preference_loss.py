"""Preference tuning pieces without TRL: chunked per-token log-probs against the dense
log_softmax, the model's per-document sums (packed, unpacked, dense), and the DPO/IPO/ORPO
formulas against the papers' expressions written out by hand. TRL's own trainers are compared in
test_preference_trl.py."""

from __future__ import annotations

import math

import pytest
import torch

from gemma3_tune.model import loss as loss_mod
from gemma3_tune.model.config import preset
from gemma3_tune.model.gemma3 import Gemma3
from gemma3_tune.model.init import random_init
from gemma3_tune.model.logprobs import chunked_logprobs
from gemma3_tune.train.objectives.preference_loss import dpo_loss, orpo_loss, pairs


def dense_logprobs(h, w, t):
    """The obvious way: full log_softmax, gather, zero where ignored."""
    logp = torch.log_softmax(h @ w.T, dim=-1)  # [N, V]
    picked = logp.gather(1, t.clamp(min=0)[:, None])[:, 0]
    return torch.where(t != -100, picked, torch.zeros_like(picked))


def _problem(seed, dtype, n=70, d=24, v=1000, need_w=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_(True)
    w = (torch.randn(v, d, generator=g, dtype=dtype) * 0.3).requires_grad_(need_w)
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = -100
    t[30:40] = -100  # a run of ignored rows across a chunk edge
    upstream = torch.randn(n, generator=g, dtype=dtype)  # a gradient that differs per row
    return h, w, t, upstream


@pytest.mark.parametrize("need_w", [True, False], ids=["full", "frozen_head"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_chunked_logprobs_equal_dense(monkeypatch, need_w, dtype, tol):
    """Chunks of 16 rows (4 per call): values, d/d hidden, d/d weight (recomputed in backward)
    or d/d hidden alone (prepared in the forward, frozen head) equal the dense reference."""
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", 16 * 1000)
    monkeypatch.setattr(loss_mod, "_CHUNK_MULTIPLE", 1)  # rows exactly as set
    h, w, t, up = _problem(0, dtype, need_w=need_w)
    got, want = chunked_logprobs(h, w, t), dense_logprobs(h, w, t)
    assert got.dtype == dtype and got.shape == (70,)
    assert (got - want).abs().max().item() <= tol
    assert bool((got[t == -100] == 0).all())
    inputs = (h, w) if need_w else (h,)
    grads = torch.autograd.grad((got * up).sum(), inputs)
    grads_want = torch.autograd.grad((want * up).sum(), inputs)
    for a, b in zip(grads, grads_want, strict=True):
        assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())
    assert grads[0][t == -100].abs().max().item() == 0.0  # ignored rows get no gradient


def test_chunked_logprobs_all_ignored():
    h = torch.randn(4, 8, requires_grad=True)
    out = chunked_logprobs(h, torch.randn(10, 8), torch.full((4,), -100))
    out.sum().backward()
    assert out.tolist() == [0.0] * 4 and h.grad.abs().sum().item() == 0.0


# -- the model's per-document sums -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return random_init(Gemma3(preset("tiny"), attn_backend="sdpa"), seed=5).eval()


def _doc(seed: int, length: int, labelled: slice | None):
    """ids [L] and labels [L] (-100 outside `labelled`; the first token is never labelled)."""
    ids = torch.randint(4, 500, (length,), generator=torch.Generator().manual_seed(seed))
    labels = torch.full_like(ids, -100)
    if labelled is not None:
        labels[labelled] = ids[labelled]
    return ids, labels


# Two rows, row-major: row 0 holds three documents (the middle one has no labelled token, as a
# prompt-only document would) and padding; row 1 holds two, the second longer than the sliding
# window (16) and labelled up to the row's last token.
ROWS = [
    [(1, 13, slice(5, 13)), (2, 9, None), (3, 20, slice(4, 11)), ("pad", 6, None)],
    [(4, 7, slice(2, 7)), (5, 41, slice(10, 41))],
]


def _packed():
    ids, labels, pos, docs = [], [], [], []
    for row in ROWS:
        parts = []
        for seed, length, labelled in row:
            if seed == "pad":  # padding: its own "document", positions 0, 1, ... again
                d = (torch.zeros(length, dtype=torch.long), torch.full((length,), -100))
            else:
                d = _doc(seed, length, labelled)
                if labelled is not None:
                    docs.append(d)
            parts.append((d, length))
        ids.append(torch.cat([d[0] for d, _ in parts]))
        labels.append(torch.cat([d[1] for d, _ in parts]))
        pos.append(torch.cat([torch.arange(n) for _, n in parts]))
    return torch.stack(ids), torch.stack(labels), torch.stack(pos), docs


def _dense_document_sums(logits, labels, pos):
    """Per document with a labelled target: sum of log_softmax(logits[t])[labels[t + 1]] over
    t + 1 inside the same document, from the model's plain logits, one document at a time."""
    logp = torch.log_softmax(logits, dim=-1)  # [B, T, V]
    sums, counts = [], []
    for r in range(labels.shape[0]):
        starts = (pos[r] == 0).nonzero()[:, 0].tolist() + [labels.shape[1]]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            total, n = logp.new_zeros(()), 0
            for t in range(a, b - 1):
                if labels[r, t + 1] != -100:
                    total = total + logp[r, t, labels[r, t + 1]]
                    n += 1
            if n:
                sums.append(total)
                counts.append(n)
    return torch.stack(sums), torch.tensor(counts)


def test_sequence_logps_equal_dense_and_unpacked(tiny):
    """Packed rows with padding: per-document sums and counts equal the dense per-document
    computation from the model's plain logits (values and every parameter's gradient), and each
    document run alone; the labelless document and the padding are left out."""
    ids, labels, pos, docs = _packed()
    out = tiny(ids, position_ids=pos, labels=labels, num_items_in_batch=99, sequence_logps=True)
    assert set(out) == {"logps", "tokens"} and out.logps.dtype == torch.float32
    want, counts = _dense_document_sums(tiny(ids, position_ids=pos).logits, labels, pos)
    assert out.tokens.tolist() == counts.tolist() == [8, 7, 5, 31]
    assert (out.logps - want).abs().max().item() <= 1e-5
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # a different upstream gradient per document
    params = [p for p in tiny.parameters()]
    got_g = torch.autograd.grad((out.logps * weights).sum(), params)
    want_g = torch.autograd.grad((want * weights).sum(), params)
    scale = max(g.abs().max().item() for g in want_g)
    assert (
        max((a - b).abs().max().item() for a, b in zip(got_g, want_g, strict=True)) <= 1e-5 * scale
    )
    with torch.no_grad():
        for k, (d_ids, d_labels) in enumerate(docs):
            alone = tiny(d_ids[None], labels=d_labels[None], sequence_logps=True)
            assert alone.tokens.tolist() == [counts[k].item()]
            assert abs(alone.logps.item() - out.logps[k].item()) <= 1e-5


def test_sequence_logps_drop_a_label_across_documents(tiny):
    """A label on a document's first token is not predicted from the previous document."""
    ids, labels, pos, _ = _packed()
    leaky = labels.clone()
    leaky[0, 13] = ids[0, 13]  # first token of row 0's second (otherwise labelless) document
    with torch.no_grad():
        a = tiny(ids, position_ids=pos, labels=labels, sequence_logps=True)
        b = tiny(ids, position_ids=pos, labels=leaky, sequence_logps=True)
    assert torch.equal(a.logps, b.logps) and torch.equal(a.tokens, b.tokens)


def test_sequence_logps_without_labels_is_refused(tiny):
    with pytest.raises(ValueError, match="sequence_logps=True needs labels"):
        tiny(torch.ones(1, 4, dtype=torch.long), sequence_logps=True)


# -- the formulas, written out by hand -------------------------------------------------------


def _pair_values(seed=7, p=5):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 40, (p, 2), generator=g)
    policy = (-torch.rand(p, 2, generator=g) * 3 - 0.05) * tokens  # summed log-probs < 0
    reference = policy.detach() + torch.randn(p, 2, generator=g)
    return policy.double().requires_grad_(True), reference.double(), tokens


def _log_sigmoid(x: float) -> float:
    return math.log(1.0 / (1.0 + math.exp(-x)))


@pytest.mark.parametrize(
    "kind,beta,eps",
    [("sigmoid", 0.1, 0.0), ("sigmoid", 0.1, 0.2), ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0)],
)
def test_dpo_formulas_by_hand(kind, beta, eps):
    """DPO (Rafailov et al. eq. 7), cDPO (Mitchell, eq. 3) and IPO (Azar et al. eq. 17, with
    TRL's per-token averaging), in plain Python floats; gradients by central differences."""
    policy, reference, tokens = _pair_values()

    def by_hand(pol):
        per_pair = []
        for (pc, pr), (rc, rr), (nc, nr) in zip(
            pol.tolist(), reference.tolist(), tokens.tolist(), strict=True
        ):
            if kind == "sigmoid":
                x = beta * ((pc - rc) - (pr - rr))
                per_pair.append(-(1 - eps) * _log_sigmoid(x) - eps * _log_sigmoid(-x))
            else:
                per_pair.append(((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2)
        return sum(per_pair) / len(per_pair)

    loss, metrics = dpo_loss(policy, reference, tokens, beta, kind, eps)
    assert abs(loss.item() - by_hand(policy)) <= 1e-12
    (grad,) = torch.autograd.grad(loss, policy)
    for i, j in [(0, 0), (2, 1), (4, 0)]:
        step = torch.zeros_like(policy)
        step[i, j] = 1e-6
        numeric = (by_hand(policy + step) - by_hand(policy - step)) / 2e-6
        assert abs(grad[i, j].item() - numeric) <= 1e-7
    chosen = [
        beta * (a - b) for a, b in zip(policy[:, 0].tolist(), reference[:, 0].tolist(), strict=True)
    ]
    rejected = [
        beta * (a - b) for a, b in zip(policy[:, 1].tolist(), reference[:, 1].tolist(), strict=True)
    ]
    assert abs(metrics["rewards/chosen"].item() - sum(chosen) / 5) <= 1e-6
    assert abs(metrics["rewards/margins"].item() - (sum(chosen) - sum(rejected)) / 5) <= 1e-6
    acc = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / 5
    assert metrics["rewards/accuracies"].item() == pytest.approx(acc)
    assert abs(metrics["logps/rejected"].item() - policy[:, 1].mean().item()) <= 1e-6


def test_orpo_formula_by_hand():
    """ORPO (Hong et al. eqs. 2-7): mean log-prob per reply token P, odds = P / (1 - P),
    L = NLL(chosen replies) - lambda * mean log sigmoid(log(odds_c / odds_r)); here the odds are
    taken literally (exp, divide, log), not through TRL's log1mexp."""
    policy, _, tokens = _pair_values(seed=8)
    lam = 0.25

    def by_hand(pol):
        terms, nll_sum, nll_n = [], 0.0, 0
        for (pc, pr), (nc, nr) in zip(pol.tolist(), tokens.tolist(), strict=True):
            p_c, p_r = math.exp(pc / nc), math.exp(pr / nr)
            terms.append(_log_sigmoid(math.log((p_c / (1 - p_c)) / (p_r / (1 - p_r)))))
            nll_sum, nll_n = nll_sum - pc, nll_n + nc
        return nll_sum / nll_n - lam * sum(terms) / len(terms), terms

    loss, metrics = orpo_loss(policy, tokens, lam)
    want, terms = by_hand(policy)
    assert abs(loss.item() - want) <= 1e-10
    assert abs(metrics["log_odds_ratio"].item() - sum(terms) / len(terms)) <= 1e-6
    nll = -policy[:, 0].sum().item() / tokens[:, 0].sum().item()
    assert abs(metrics["nll_loss"].item() - nll) <= 1e-6
    avg = policy.detach() / tokens
    assert abs(metrics["rewards/chosen"].item() - lam * avg[:, 0].mean().item()) <= 1e-6
    assert abs(metrics["logps/chosen"].item() - avg[:, 0].mean().item()) <= 1e-6
    (grad,) = torch.autograd.grad(loss, policy)
    for i, j in [(0, 0), (1, 1), (3, 0)]:
        step = torch.zeros_like(policy)
        step[i, j] = 1e-6
        numeric = (by_hand(policy + step)[0] - by_hand(policy - step)[0]) / 2e-6
        assert abs(grad[i, j].item() - numeric) <= 1e-7


def test_pairs_folds_documents_and_refuses_an_odd_count():
    logps = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    tokens = torch.tensor([1, 2, 3, 4])
    pol, tok = pairs(logps, tokens)
    assert pol.tolist() == [[-1.0, -2.0], [-3.0, -4.0]] and tok.tolist() == [[1, 2], [3, 4]]
    with pytest.raises(RuntimeError, match="3 scored documents in a preference batch"):
        pairs(logps[:3], tokens[:3])


def test_bad_options_are_refused():
    policy, reference, tokens = _pair_values()
    with pytest.raises(ValueError, match="preference.loss: 'hinge'"):
        dpo_loss(policy, reference, tokens, 0.1, "hinge")
    with pytest.raises(ValueError, match="label_smoothing applies to loss: sigmoid only"):
        dpo_loss(policy, reference, tokens, 0.1, "ipo", 0.1)
    with pytest.raises(ValueError, match=r"not in \[0, 0.5\)"):
        dpo_loss(policy, reference, tokens, 0.1, "sigmoid", 0.5)
