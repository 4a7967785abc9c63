"""GRPO's loss (every loss_type, token and sequence importance sampling, with and without the
KL term) against TRL 1.16's own `GRPOTrainer._compute_loss` on transformers' Gemma 3 + peft.

Both sides hold the same weights (a random Gemma3ForCausalLM loaded into ours, the same LoRA
tensors), the same prompts and completions (as ids), advantages and old log-probs. TRL scores
the completions with its own forward (logits / temperature) and formulas; ours packs each
prompt + completion as a document and scores it through the chunked log-prob path. Loss,
LoRA gradients and the clip-ratio / KL stats must agree to 1e-5. Advantages are checked
against a hand computation with numpy (the definitions: group mean, Bessel std, NaN rows).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import peft
import pytest
import torch
from datasets import Dataset
from reference import hf_model
from test_preference_trl import (
    CFG,
    LORA_TARGETS,
    _common_args,
    _max_rel_grad_diff,
    _ours_from,
    _randomise_lora,
    _tokenizer,
)

from gemma3_tune.train.objectives.grpo import Rollout, completion_logps
from gemma3_tune.train.objectives.grpo_loss import (
    PolicyLossSettings,
    advantages,
    combine_rewards,
    policy_loss,
)

trl = pytest.importorskip("trl")

PROMPT_LEN, LENGTHS, TEMPERATURE = 5, [7, 3, 11, 6, 9, 2, 11, 4], 0.7


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, 500, (PROMPT_LEN,), generator=g).tolist() for _ in range(2)]
    completions = [torch.randint(4, 500, (n,), generator=g).tolist() for n in LENGTHS]
    adv = torch.randn(len(LENGTHS), generator=g)
    return prompts, completions, adv


def _trl_inputs(prompts, completions, adv, group: int) -> dict:
    width = max(len(c) for c in completions)
    ids = torch.zeros(len(completions), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(completions):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    p = torch.tensor([prompts[i // group] for i in range(len(completions))])
    return {
        "prompt_ids": p,
        "prompt_mask": torch.ones_like(p),
        "completion_ids": ids,
        "completion_mask": mask,
        "advantages": adv,
        "num_items_in_batch": mask.sum(),
    }


def _trl_trainer(tmp_path, loss_type: str, level: str, beta: float):
    hf = hf_model(CFG, seed=3)
    ours = _ours_from(hf)
    args = trl.GRPOConfig(
        loss_type=loss_type, importance_sampling_level=level, beta=beta, epsilon=0.2,
        epsilon_high=0.28, num_generations=4, per_device_train_batch_size=8,
        max_completion_length=16, temperature=TEMPERATURE, **_common_args(tmp_path),
    )  # fmt: skip
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS)
    trainer = trl.GRPOTrainer(
        model=hf, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        args=args, train_dataset=Dataset.from_dict({"prompt": ["t5 t6"] * 8}),
        processing_class=_tokenizer(), peft_config=lora,
    )  # fmt: skip
    _randomise_lora(trainer.model, seed=11)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer, ours


def _ours(ours, trainer, prompts, completions):
    """Our model with TRL's adapter tensors (copied by name), the rollout's log-probs."""
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS)
    model = peft.get_peft_model(ours, lora)
    theirs = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    mine = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert mine.keys() == theirs.keys()
    with torch.no_grad():
        for n, p in mine.items():
            p.copy_(theirs[n])
    model.train()
    group = len(completions) // len(prompts)
    ro = Rollout(
        [SimpleNamespace(ids=p, images=[]) for p in prompts], completions,
        torch.zeros(len(completions), dtype=torch.bool), [""] * len(completions),
        torch.zeros(len(completions), 1), torch.zeros(len(completions)),
        torch.zeros(len(completions)), torch.zeros(len(completions), dtype=torch.bool), None, 0.0,
    )  # fmt: skip
    assert group == 4
    return model, ro


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """One TRL trainer and our model with its adapter, shared by the loss cases (each sets
    the trainer's loss settings, as GRPOTrainer.__init__ copies them from its config)."""
    prompts, completions, _ = _batch(seed=1)
    trainer, ours = _trl_trainer(tmp_path_factory.mktemp("trl"), "dapo", "token", 0.0)
    model, ro = _ours(ours, trainer, prompts, completions)
    return trainer, model, ro


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_loss_equals_trl(pair, loss_type, level, beta):
    prompts, completions, adv = _batch(seed=1)
    trainer, model, ro = pair
    trainer.loss_type, trainer.importance_sampling_level, trainer.beta = loss_type, level, beta
    trainer._metrics["train"].clear()
    for m in (trainer.model, model):
        m.zero_grad(set_to_none=True)
    inputs = _trl_inputs(prompts, completions, adv, group=4)
    mask = inputs["completion_mask"].bool()

    logps = completion_logps(model, ro, pad_id=0, temperature=TEMPERATURE)  # [N, T]
    with torch.no_grad(), model.disable_adapter():
        ref = completion_logps(model, ro, pad_id=0, temperature=TEMPERATURE)
    g = torch.Generator().manual_seed(5)  # off-policy: ratios away from 1, some clipped
    old = (logps.detach() + 0.3 * torch.randn(logps.shape, generator=g)) * mask
    inputs["old_per_token_logps"] = old
    inputs["ref_per_token_logps"] = ref

    want = trainer._compute_loss(trainer.model, inputs)
    want.backward()
    want_g = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    settings = PolicyLossSettings(loss_type, 0.2, 0.28, None, beta, level, 16)
    got, stats = policy_loss(logps, old, ref if beta else None, adv, mask, settings, 1,
                             mask.sum())  # fmt: skip
    got.backward()
    got_g = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    assert abs(got.item() - want.item()) <= 1e-5, (got.item(), want.item())
    assert _max_rel_grad_diff(got_g, want_g) <= 1e-5
    assert abs(want.item()) > 1e-3
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert metrics["clip_ratio/region_mean"] > 0  # the test exercises clipping
    for key, value in stats.items():
        assert abs(value.item() - metrics[key]) <= 1e-5, key


def test_our_log_probs_equal_trls(tmp_path):
    """Per completion token, at the sampling temperature, adapter on and off."""
    prompts, completions, adv = _batch(seed=2)
    trainer, ours = _trl_trainer(tmp_path, "dapo", "token", 0.0)
    inputs = _trl_inputs(prompts, completions, adv, group=4)
    model, ro = _ours(ours, trainer, prompts, completions)
    mask = inputs["completion_mask"].bool()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    width = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        for adapter in (True, False):
            ctx = trainer.model.disable_adapter() if not adapter else torch.enable_grad()
            ctx_ours = model.disable_adapter() if not adapter else torch.enable_grad()
            with ctx:
                want = trainer._get_per_token_logps_and_entropies(
                    trainer.model, ids, attention, width
                )[0]
            with ctx_ours:
                got = completion_logps(model, ro, pad_id=0, temperature=TEMPERATURE)
            assert (got - want)[mask].abs().max() <= 1e-5


def _hand_advantages(rewards: np.ndarray, group: int, scale: str) -> np.ndarray:
    out = np.zeros_like(rewards)
    batch_std = np.nanstd(rewards, ddof=1)
    for start in range(0, len(rewards), group):
        r = rewards[start : start + group]
        ok = ~np.isnan(r)
        a = r - r[ok].mean()
        std = r[ok].std(ddof=1) if ok.sum() > 1 else np.nan
        if scale == "group":
            a = a / (std + 1e-4)
        elif scale == "batch":
            a = a / (batch_std + 1e-4)
        out[start : start + group] = np.where(ok, a, 0.0)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_a_hand_computation(scale):
    per_function = torch.tensor(
        [[1.0, 0.5], [0.0, float("nan")], [float("nan"), float("nan")], [1.0, 1.0],
         [0.2, 0.0], [0.2, 0.0], [0.2, 0.0], [0.2, 0.0]]
    )  # fmt: skip
    weights = torch.tensor([1.0, 2.0])
    rewards = combine_rewards(per_function, weights)
    assert torch.isnan(rewards[2]) and rewards[0] == 2.0 and rewards[1] == 0.0
    adv, zero_std = advantages(rewards, 4, scale)
    want = _hand_advantages(rewards.numpy().astype(np.float64), 4, scale)
    assert np.allclose(adv.numpy(), want, atol=1e-6)
    assert adv[2] == 0.0  # unscorable: no signal
    assert zero_std.tolist() == ([False] * 4 + [True] * 4 if scale != "batch" else [False] * 8)
