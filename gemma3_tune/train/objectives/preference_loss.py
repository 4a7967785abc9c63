"""Preference tuning: DPO (sigmoid, with optional conservative label smoothing), IPO and ORPO.

The formulas only, on per-pair tensors. The model scores each document of a packed batch
(`model(..., labels=labels, sequence_logps=True)`: per document, the summed log-probability of
its reply tokens and their count); a preference pair is two documents, prompt+chosen then
prompt+rejected, so `pairs` folds the documents into `[P, 2]` (column 0 chosen, 1 rejected).
The reference model's log-probs are prepared before training and arrive with the batch.

Each loss is TRL 1.16's, term for term, except the two choices noted below
(tests/test_preference_trl.py drives TRL's own trainers on the same pairs); line numbers of
trl/trainer/dpo_trainer.py and trl/experimental/orpo/orpo_trainer.py:
- sigmoid (1383-1388): -log sigmoid(beta * delta), delta = (pi_c - ref_c) - (pi_r - ref_r).
  With label_smoothing eps it is conservative DPO (Mitchell, "cDPO", eq. 3):
  -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta). TRL 1.16's `sigmoid`
  ignores label_smoothing (its config documents it for `robust` and `exo_pair` only); the cDPO
  line is what TRL's `sigmoid` computed before 1.0, and what its `aot` loss still computes
  (1447-1457; at one pair per batch the sort there is the identity).
- ipo (1393-1404): ((delta_c / n_c - delta_r / n_r) - 1 / (2 beta))^2, the log-ratios averaged
  per reply token (TRL's note: confirmed with the IPO authors).
- Metrics (1580-1601): rewards = beta * (pi - ref) per reply, accuracies = chosen > rejected,
  margins, logps = the policy's summed log-probs; means over pairs.
- ORPO (orpo_trainer.py 87-91, 670-702, 798-848): with per-token average log-probs a_c, a_r,
  log_odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r)), loss = nll - lambda *
  mean(log sigmoid(log_odds)). TRL's nll is the cross-entropy over the chosen documents'
  prompt AND reply tokens; here it is over the chosen replies only (pooled over the pairs' reply
  tokens, as TRL pools), because the batch labels replies only (the DPO terms need exactly
  that) - the ORPO paper's L_SFT on y_w, and the official implementation's
  `disable_prompt_loss`. With a one-token prompt the two agree (the tests compare there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("sigmoid", "ipo")


def pairs(logps: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Per-document `[S]` log-probs and token counts -> `[P, 2]` each (chosen, rejected).

    Documents come in order chosen_0, rejected_0, chosen_1, ...: an odd count means a document
    lost every labelled token (a reply truncated away) and the pairing would be wrong."""
    s = logps.shape[0]
    if s % 2:
        raise RuntimeError(
            f"{s} scored documents in a preference batch: each pair needs two (chosen, then"
            " rejected), each with at least one labelled reply token; was a reply truncated"
            " away? (data.max_seq_len)"
        )
    return logps.view(-1, 2), tokens.view(-1, 2)


def _means(**values: Tensor) -> dict[str, Tensor]:
    return {k.replace("__", "/"): v.detach().mean() for k, v in values.items()}


def _pair_metrics(rewards: Tensor, logps: Tensor, **more: Tensor) -> dict[str, Tensor]:
    """TRL's reward metrics from per-reply rewards and log-probs `[P, 2]` (chosen, rejected),
    means over pairs, and `more` beside them."""
    return _means(
        rewards__chosen=rewards[:, 0],
        rewards__rejected=rewards[:, 1],
        rewards__margins=rewards[:, 0] - rewards[:, 1],
        rewards__accuracies=(rewards[:, 0] > rewards[:, 1]).float(),
        logps__chosen=logps[:, 0],
        logps__rejected=logps[:, 1],
        **more,
    )


def dpo_loss(
    policy: Tensor,
    reference: Tensor,
    tokens: Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO/IPO loss (mean over pairs) and TRL's metrics. policy, reference: `[P, 2]` summed
    reply log-probs (chosen, rejected); tokens: `[P, 2]` reply tokens per document."""
    if loss not in LOSSES:
        raise ValueError(f"preference.loss: {loss!r} is not one of {', '.join(LOSSES)}")
    if loss == "ipo" and label_smoothing:
        raise ValueError("preference.label_smoothing applies to loss: sigmoid only, not ipo")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"preference.label_smoothing: {label_smoothing} is not in [0, 0.5)")
    ratio = policy - reference  # [P, 2]: log pi / pi_ref per reply
    if loss == "sigmoid":
        delta = ratio[:, 0] - ratio[:, 1]  # [P]
        per_pair = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        if label_smoothing:
            per_pair = per_pair - label_smoothing * F.logsigmoid(-beta * delta)
    else:
        avg = ratio / tokens.clamp(min=1)  # [P, 2]: per reply token
        per_pair = (avg[:, 0] - avg[:, 1] - 1 / (2 * beta)) ** 2
    return per_pair.mean(), _pair_metrics(beta * ratio, policy)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, stable on both sides of -ln 2 (Maechler), as TRL computes it."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


def orpo_loss(policy: Tensor, tokens: Tensor, lam: float) -> tuple[Tensor, dict[str, Tensor]]:
    """ORPO loss and TRL's metrics. policy: `[P, 2]` summed reply log-probs (chosen, rejected);
    tokens: `[P, 2]` reply tokens per document; lam: the odds-ratio weight (TRL's beta)."""
    avg = policy / tokens.clamp(min=1)  # [P, 2]: mean log-prob per reply token
    log_odds = (avg[:, 0] - avg[:, 1]) - (_log1mexp(avg[:, 0]) - _log1mexp(avg[:, 1]))  # [P]
    ratio = F.logsigmoid(log_odds)  # [P]
    nll = -policy[:, 0].sum() / tokens[:, 0].sum().clamp(min=1)  # chosen reply tokens, pooled
    metrics = _pair_metrics(
        lam * avg, avg, nll_loss=nll, log_odds_ratio=ratio, log_odds_chosen=log_odds
    )
    return nll - lam * ratio.mean(), metrics
