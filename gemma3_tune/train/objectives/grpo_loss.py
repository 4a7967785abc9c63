"""GRPO and its successors (DAPO, Dr. GRPO, BNPO, GSPO): advantages and the clipped policy
loss, on per-token log-probabilities of completions. The formulas only; grpo.py runs them.

Each is TRL 1.16's `GRPOTrainer`, term for term (tests/test_grpo_trl.py drives TRL's
`_compute_loss` and advantage code on the same completions); line numbers of
trl/trainer/grpo_trainer.py:
- advantages (2759-2810, `sum_then_normalize`): rewards = the reward functions' weighted
  nansum, NaN where every function returned None; A = r - mean(group), divided by
  std(group) + 1e-4 (`scale_rewards: group`), by the whole batch's std (`batch`), or not
  (`none`); std is NaN-aware with Bessel's correction; an unscorable completion gets A = 0.
- importance weights (3082-3094): log w = logp - logp_old per token, or its mean over the
  completion's tokens (`importance_sampling_level: sequence`, GSPO).
- KL to a reference (3097-3105, beta > 0): exp(ref - logp) - (ref - logp) - 1, times w
  (TRL's `use_bias_correction_kl`, default on).
- clipped objective (3110-3119): -min(w A, clip(w, 1 - epsilon, 1 + epsilon_high) A), with
  `delta` capping w from above (two-sided clipping) when set.
- reduction (3143-3181): grpo: mean over tokens per completion, then over completions; bnpo:
  mean over the micro-batch's tokens; dr_grpo: sum / (completions x max_completion_length);
  dapo: sum / (the optimizer step's completion tokens over all processes / processes), so a
  step's micro-batches add up to a token mean over the whole step (`num_items`).
  grpo, bnpo and dr_grpo divide by the accumulation steps in training; dapo's divisor has it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")


def nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (NaN for fewer than 2)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = var * torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    return var.sqrt().squeeze(dim) if dim is not None else var.sqrt().reshape(())


def combine_rewards(per_function: Tensor, weights: Tensor) -> Tensor:
    """`[N, F]` rewards (NaN: the function does not apply) -> `[N]`, the weighted sum over
    the functions that apply; NaN where none does."""
    rewards = (per_function * weights[None]).nansum(dim=1)
    rewards[torch.isnan(per_function).all(dim=1)] = float("nan")
    return rewards


def advantages(rewards: Tensor, group: int, scale: str) -> tuple[Tensor, Tensor]:
    """`[N]` rewards, groups of `group` consecutive completions of one prompt -> (advantages
    `[N]`, whether each one's std is zero `[N]`: a group with no signal)."""
    grouped = rewards.view(-1, group)  # [prompts, G]
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group)
    if scale in ("group", "none"):
        std = nanstd(grouped, dim=1).repeat_interleave(group) if group > 1 else rewards * 0
    elif scale == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else rewards * 0
    else:
        raise ValueError(f"rl.scale_rewards: {scale!r} is not one of group, batch, none")
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(adv, nan=0.0), zero_std


@dataclass(frozen=True)
class PolicyLossSettings:
    loss_type: str = "dapo"
    epsilon: float = 0.2  # lower clip: 1 - epsilon
    epsilon_high: float = 0.2  # upper clip: 1 + epsilon_high (DAPO's clip-higher)
    delta: float | None = None  # upper cap on the importance weight (two-sided clipping)
    beta: float = 0.0  # KL weight
    level: str = "token"  # importance sampling: token | sequence (GSPO)
    max_completion_length: int = 256  # dr_grpo's constant normaliser


def policy_loss(
    logps: Tensor,
    old: Tensor | None,
    ref: Tensor | None,
    adv: Tensor,
    mask: Tensor,
    s: PolicyLossSettings,
    accumulation: int = 1,
    num_items: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The micro-batch's loss and TRL's stats. logps, old, ref, mask: `[B, T]` per completion
    token (padding masked out); adv: `[B]`; old None: on-policy (logps detached, w = 1);
    `accumulation`: this step's micro-batches (1 at evaluation); `num_items` (dapo): the
    step's completion tokens over all processes / processes."""
    mask = mask.to(logps.dtype)
    old = logps.detach() if old is None else old
    log_ratio = logps - old  # [B, T]
    if s.level == "token":
        log_w = log_ratio
    elif s.level == "sequence":
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]  # [B, 1]
    else:
        raise ValueError(f"rl.importance_sampling_level: {s.level!r} is not token or sequence")
    w = torch.exp(log_w)
    a = adv[:, None]
    clipped = torch.clamp(w, 1 - s.epsilon, 1 + s.epsilon_high)
    capped = w if s.delta is None else torch.clamp(w, max=s.delta)
    per_token = -torch.min(capped * a, clipped * a)
    kl = None
    if s.beta != 0.0:
        d = ref - logps
        kl = (torch.exp(d) - d - 1) * w  # TRL's bias-corrected KL
        per_token = per_token + s.beta * kl
    loss = _reduce(per_token, mask, s, accumulation, num_items)
    return loss, _stats(w, a, kl, mask, s)


def _reduce(per_token: Tensor, mask: Tensor, s: PolicyLossSettings, accumulation, num_items):
    masked = per_token * mask
    if s.loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if s.loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
    if s.loss_type == "dr_grpo":
        return masked.sum() / (per_token.size(0) * s.max_completion_length) / accumulation
    if s.loss_type == "dapo":
        if num_items is None:
            raise ValueError("loss_type dapo needs the step's completion tokens (num_items)")
        return masked.sum() / torch.as_tensor(num_items, dtype=masked.dtype).clamp(min=1.0)
    raise ValueError(f"rl.loss_type: {s.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")


def _stats(w: Tensor, a: Tensor, kl: Tensor | None, mask: Tensor, s: PolicyLossSettings):
    """TRL's clip ratios (and KL), as masked means over this micro-batch's tokens."""

    def mean(x: Tensor) -> Tensor:
        if x.shape[1] == 1:  # sequence level: one value per completion
            return x.float().mean().detach()
        return ((x * mask).sum() / mask.sum().clamp(min=1.0)).detach()

    low = ((w < 1 - s.epsilon) & (a < 0)).to(mask.dtype)
    high = ((w > 1 + s.epsilon_high) & (a > 0)).to(mask.dtype)
    stats = {
        "clip_ratio/low_mean": mean(low),
        "clip_ratio/high_mean": mean(high),
        "clip_ratio/region_mean": mean(torch.maximum(low, high)),
    }
    if kl is not None:
        stats["kl"] = mean(kl)
    return stats
