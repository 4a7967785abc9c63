"""objective: grpo's bad input, each refused by `gemma3-tune train` in one line naming the file,
the row or the key, before any model loads."""

from __future__ import annotations

import json

import pytest
from trainutil import chat_set, refused_in_one_line, write_recipe


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"number {k}", "n": k}) + "\n" for k in range(4)))
    return path


def _recipe(tmp_path, tiny_dir, data, **over):
    over.setdefault("objective", "grpo")
    over.setdefault("rl__rewards", ["json_valid"])
    over.setdefault("rl__max_completion_length", 16)
    return str(write_recipe(tmp_path / "r.yaml", tiny_dir, data, tmp_path / "run", **over))


def test_prompt_rows_with_sft(tmp_path, tiny_dir, prompts, capsys):
    r = _recipe(tmp_path, tiny_dir, prompts, objective="sft")
    refused_in_one_line(capsys, ["train", r], f"{prompts}:1", "objective: grpo")


def test_chat_rows_with_grpo(tmp_path, tiny_dir, capsys):
    chats = chat_set(tmp_path / "chats.jsonl", n=4)
    r = _recipe(tmp_path, tiny_dir, chats)
    refused_in_one_line(capsys, ["train", r], f"{chats}:1", "prompts only", "objective: sft")


def test_missing_reward_file(tmp_path, tiny_dir, prompts, capsys):
    r = _recipe(tmp_path, tiny_dir, prompts, rl__rewards=[f"{tmp_path}/nope.py:f"])
    refused_in_one_line(capsys, ["train", r], "nope.py:f", "no file")
    assert not (tmp_path / "run").exists()


def test_reward_with_the_wrong_signature(tmp_path, tiny_dir, prompts, capsys):
    (tmp_path / "bad.py").write_text("def f(x):\n    return [0.0]\n")
    r = _recipe(tmp_path, tiny_dir, prompts, rl__rewards=[f"{tmp_path}/bad.py:f"])
    refused_in_one_line(capsys, ["train", r], "bad.py:f", "completions")


def test_one_generation(tmp_path, tiny_dir, prompts, capsys):
    r = _recipe(tmp_path, tiny_dir, prompts, rl__num_generations=1)
    refused_in_one_line(capsys, ["train", r], "rl.num_generations")


def test_no_room_for_the_completions(tmp_path, tiny_dir, prompts, capsys):
    r = _recipe(tmp_path, tiny_dir, prompts, rl__max_completion_length=128)
    refused_in_one_line(capsys, ["train", r], "data.max_seq_len", "rl.max_completion_length")


def test_no_rewards(tmp_path, tiny_dir, prompts, capsys):
    r = _recipe(tmp_path, tiny_dir, prompts, rl__rewards=[])
    refused_in_one_line(capsys, ["train", r], "rl.rewards")


def test_eval_reward_needs_grpo(tmp_path, tiny_dir, capsys):
    chats = chat_set(tmp_path / "chats.jsonl", n=4)
    r = _recipe(tmp_path, tiny_dir, chats, objective="sft", eval__metric=["reward"])
    refused_in_one_line(capsys, ["train", r], "eval.metric: reward", "objective grpo")


def test_eval_reward_needs_held_out_prompts(tmp_path, tiny_dir, prompts, capsys):
    r = _recipe(tmp_path, tiny_dir, prompts, eval__metric=["reward"])
    refused_in_one_line(capsys, ["train", r], "eval.metric: reward", "data.eval")
