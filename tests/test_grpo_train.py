"""`objective: grpo` end to end on the tiny model: prompts in, completions sampled and scored by
a reward function, the policy loss trained, every completion and its rewards in
completions.jsonl, TRL's stats in metrics.jsonl, the adapter saved; a second run with the same
seed samples the same completions (generators seeded per step, prompt row and sample)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainutil import sigkill_and_resume_matches, write_recipe

from gemma3_tune.cli import main

REWARD = '''
def mentions_number(prompts, completions, completion_ids, number, **kw):
    """1 when the completion holds the row's number, None on rows without one."""
    return [None if n is None else float(str(n) in c) for c, n in zip(completions, number)]
'''


def _prompts(path: Path) -> Path:
    rows = [{"prompt": f"number {k}", "number": k} for k in range(6)]
    rows.append({"prompt": "no number here", "number": None})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tmp_path: Path, tiny_dir: Path, name: str) -> Path:
    (tmp_path / "reward.py").write_text(REWARD)
    data = _prompts(tmp_path / "prompts.jsonl")
    recipe = write_recipe(
        tmp_path / f"{name}.yaml", tiny_dir, data, tmp_path / name,
        objective="grpo", data__max_seq_len=48, training__max_steps=3,
        training__save_steps=100, rl__rewards=[f"{tmp_path / 'reward.py'}:mentions_number", "overlong:8:4"],
        rl__num_generations=4, rl__max_completion_length=8, rl__reward_weights=[1.0, 0.5],
    )  # fmt: skip
    assert main(["train", str(recipe)]) == 0
    return tmp_path / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir):
    tmp = tmp_path_factory.mktemp("grpo")
    return _run(tmp, tiny_dir, "a"), _run(tmp, tiny_dir, "b")


def test_completions_are_scored_by_the_reward_functions(runs):
    rows = [json.loads(x) for x in (runs[0] / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2 * 4  # steps x prompts per micro-batch x num_generations
    prompts = {f"{runs[0].parent / 'prompts.jsonl'}:{i + 1}": i for i in range(7)}
    for r in rows:
        k = prompts[r["origin"]]
        mention, overlong = r["rewards"]
        assert mention == (None if k == 6 else float(str(k) in r["completion"]))
        assert overlong <= 0.0


def test_metrics_carry_trls_names(runs):
    rows = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert len(train) == 3
    for key in (
        "reward", "reward_std", "frac_reward_zero_std", "rewards/mentions_number/mean",
        "rewards/overlong:8:4/mean", "completions/mean_length", "completions/clipped_ratio",
        "clip_ratio/region_mean", "generation_seconds",
    ):  # fmt: skip
        assert key in train[-1], key
    assert 1 <= train[-1]["completions/mean_length"] <= 8
    assert (runs[0] / "adapter" / "adapter_model.safetensors").is_file()


def test_the_same_seed_samples_the_same_completions(runs):
    a, b = ((r / "completions.jsonl").read_text() for r in runs)
    assert a == b


EVENS = '''
def evens(prompts, completions, completion_ids, **kw):
    """The share of even token ids: varies from sample to sample, so every group has signal."""
    return [sum(t % 2 == 0 for t in c) / max(len(c), 1) for c in completion_ids]
'''


def _resumable(tmp_path: Path, tiny_dir: Path, name: str) -> Path:
    (tmp_path / "evens.py").write_text(EVENS)
    data = _prompts(tmp_path / "prompts.jsonl")
    return write_recipe(
        tmp_path / f"{name}.yaml", tiny_dir, data, tmp_path / name,
        objective="grpo", data__max_seq_len=48, training__max_steps=6, training__save_steps=2,
        training__lr=2e-2, rl__rewards=[f"{tmp_path / 'evens.py'}:evens"],
        rl__num_generations=4, rl__max_completion_length=8,
    )  # fmt: skip


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_unbroken_run(tmp_path, tiny_dir):
    """Kill a GRPO run once checkpoint-4 is complete, resume it: the completions sampled, their
    rewards, the losses and the adapter equal an unbroken run's (completions.jsonl loses the
    rows logged after the checkpoint, as metrics.jsonl does)."""
    sigkill_and_resume_matches(tmp_path, lambda name: _resumable(tmp_path, tiny_dir, name))


def test_eval_metric_reward_after_training_equals_the_eval_command(tmp_path, tiny_dir, capsys):
    """`eval.metric: [reward]` scores data.eval's prompts with the run's rl.rewards after
    training (greedy, rl.max_completion_length tokens): eval.json holds what `gemma3-tune eval
    --metric reward` gives for the same run, prompts and function."""
    (tmp_path / "reward.py").write_text(REWARD)
    data, held = _prompts(tmp_path / "prompts.jsonl"), tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"say {k}", "number": k}) + "\n"
                            for k in range(3)))  # fmt: skip
    spec = f"{tmp_path / 'reward.py'}:mentions_number"
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_dir, data, tmp_path / "run", objective="grpo",
        data__max_seq_len=48, data__eval=str(held), training__max_steps=2,
        training__save_steps=100, rl__rewards=[spec], rl__num_generations=4,
        rl__max_completion_length=8, eval__metric=["reward"],
    )  # fmt: skip
    assert main(["train", str(recipe)]) == 0
    after = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert after["n"] == 3 and "reward" in after["scores"]
    capsys.readouterr()
    argv = ["eval", str(tmp_path / "run"), "--data", str(held), "--metric", "reward",
            "--reward", spec, "--max-new-tokens", "8", "--json"]  # fmt: skip
    assert main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["scores"][str(tmp_path / "run")] == pytest.approx(after["scores"]["reward"])
