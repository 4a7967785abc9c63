"""`rl.num_iterations` (mu) > 1 and `rl.beta` > 0 with method full: each generation trains mu
optimizer steps on the same prompts, with the log-probs of the policy that generated them as
the importance weights' denominator (TRL's GRPOTrainer), and a frozen copy of the starting
model is the reference for the KL term."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainutil import refused_in_one_line, sigkill_and_resume_matches, write_recipe

from gemma3_tune.train.objectives.grpo_reuse import RepeatSampler

EVENS = """
def evens(prompts, completions, completion_ids, **kw):
    return [sum(t % 2 == 0 for t in c) / max(len(c), 1) for c in completion_ids]
"""


def _recipe(tmp_path: Path, tiny_dir: Path, name: str = "run", **over) -> Path:
    (tmp_path / "evens.py").write_text(EVENS)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"number {k}"}) + "\n" for k in range(7)))
    over = {
        "objective": "grpo", "data__max_seq_len": 48, "training__max_steps": 4,
        "training__save_steps": 2, "training__lr": 2e-2,
        "rl__rewards": [f"{tmp_path / 'evens.py'}:evens"], "rl__num_generations": 4,
        "rl__max_completion_length": 8, **over,
    }  # fmt: skip
    return write_recipe(tmp_path / f"{name}.yaml", tiny_dir, data, tmp_path / name, **over)


def test_the_sampler_repeats_each_steps_prompts():
    s = RepeatSampler(rows=7, chunk=3, repeats=2, seed=0)
    order = list(s)
    assert len(order) == len(s) == 12 and s.dropped == 1
    assert order[0:3] == order[3:6] and order[6:9] == order[9:12]
    assert len(set(order[0:3] + order[6:9])) == 6  # two steps' prompts, none twice
    s.set_epoch(1)
    assert list(s) != order  # another permutation per epoch


def test_later_steps_of_a_cycle_reuse_the_generation(tmp_path, tiny_dir):
    """Steps 1-2 and 3-4 train on one generation each: same rows, same rollout, and the old
    log-probs are those of the policy that sampled them (the starting model for cycle 1: LoRA's
    B starts at 0), not of the updated one."""
    from gemma3_tune.train.objectives.grpo import completion_logps
    from gemma3_tune.train.recipe import load_recipe
    from gemma3_tune.train.trainer import build_trainer

    trainer, out, _ = build_trainer(load_recipe(_recipe(tmp_path, tiny_dir, rl__num_iterations=2)))
    objective, seen = trainer.objective, []
    own = objective._train_rollout

    def spy(trainer_, model, inputs, rows):
        got = own(trainer_, model, inputs, rows)
        seen.append((trainer_.state.global_step, rows, *got[:2]))
        return got

    objective._train_rollout = spy
    trainer.train()
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert seen[0][1] == seen[1][1] and seen[2][1] == seen[3][1] and seen[0][1] != seen[2][1]
    assert seen[0][2] is seen[1][2] and seen[2][2] is seen[3][2]
    assert seen[0][3] is None and seen[2][3] is None  # a fresh generation: on-policy
    ro, old = seen[1][2], seen[1][3]
    with torch.no_grad(), trainer.model.disable_adapter():
        start = completion_logps(trainer.model, ro, objective.tok.pad_id, 1.0)
    torch.testing.assert_close(old, start, atol=1e-5, rtol=0)
    with torch.no_grad():
        now = completion_logps(trainer.model, ro, objective.tok.pad_id, 1.0)
    assert (now - old).abs().max() > 1e-3  # the importance weights are not all 1
    rows = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [1, 3]  # written once per generation
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    gen = [r["generation_seconds"] for r in metrics if "loss" in r]
    assert gen[0] > 0 and gen[1] == 0 and gen[2] > 0 and gen[3] == 0


def test_full_with_beta_has_a_frozen_reference(tmp_path, tiny_dir):
    """method full, beta > 0: KL is 0 on the first step (policy = reference) and grows once the
    weights move; the reference stays the starting model."""
    from gemma3_tune.train.adapters import unwrap
    from gemma3_tune.train.recipe import load_recipe
    from gemma3_tune.train.trainer import build_trainer

    recipe = _recipe(tmp_path, tiny_dir, method="full", training__max_steps=3, rl__beta=0.1,
                     training__lr=1e-3)  # fmt: skip
    trainer, out, _ = build_trainer(load_recipe(recipe))
    start = {k: v.clone() for k, v in unwrap(trainer.model).state_dict().items()}
    trainer.train()
    reference = trainer.objective.reference.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in start.items())
    moved = unwrap(trainer.model).state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in start.items())
    kl = [json.loads(x).get("kl") for x in (out / "metrics.jsonl").read_text().splitlines()]
    kl = [k for k in kl if k is not None]
    assert len(kl) == 3 and abs(kl[0]) < 1e-7 and kl[2] > 1e-6


def test_save_steps_must_divide_into_cycles(tmp_path, tiny_dir, capsys):
    r = _recipe(tmp_path, tiny_dir, rl__num_iterations=3, training__save_steps=4)
    refused_in_one_line(capsys, ["train", str(r)], "rl.num_iterations 3", "training.save_steps")


def test_full_with_beta_under_zero3_is_refused(tmp_path, tiny_dir, capsys):
    r = _recipe(tmp_path, tiny_dir, method="full", rl__beta=0.1, deepspeed="zero3")
    refused_in_one_line(capsys, ["train", str(r)], "rl.beta > 0 with method full", "zero2")


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_unbroken_run(tmp_path, tiny_dir):
    """As test_grpo_train's, with each generation trained twice: the checkpoint falls at a cycle
    boundary, so the resumed run generates what the unbroken one did."""

    def make(name: str) -> Path:
        return _recipe(tmp_path, tiny_dir, name, training__max_steps=6, rl__num_iterations=2)

    sigkill_and_resume_matches(tmp_path, make)
