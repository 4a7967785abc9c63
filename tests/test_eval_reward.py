"""`gemma3-tune eval --metric reward`: a model's completions of prompt-only rows scored by GRPO's
reward functions. Greedy scores equal a hand computation from `generate_batch`'s replies;
sampled ones (`--samples K`) repeat for a seed and change with another, with best of K at least
the mean; every mistake is refused in one line before a model loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from trainutil import chat_set, refused_in_one_line

from gemma3_tune.cli import main
from gemma3_tune.data.records import Record
from gemma3_tune.data.rl_prompts import rl_prompt
from gemma3_tune.data.tokenizer import Tokenizer
from gemma3_tune.model.checkpoint import load_model
from gemma3_tune.model.generate import generate_batch

REWARDS = '''
def n_ids(prompts, completions, completion_ids, **kw):
    """The completion's length in tokens (its stop token included when it drew one)."""
    return [float(len(ids)) for ids in completion_ids]


def ids_mod_7(prompts, completions, completion_ids, **kw):
    """A number that changes with every token drawn."""
    return [float(sum(ids) % 7) for ids in completion_ids]


def as_chat(prompts, completions, completion_ids, **kw):
    """1 where the completion comes as TRL gives it for a conversational prompt."""
    return [float(isinstance(c, list) and c[0]["role"] == "assistant") for c in completions]
'''

PROMPTS = ["number 3", "say hi", [{"role": "user", "content": "a chat prompt"}], "number 9"]
TOKENS = 6


def _rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _eval(argv: list[str], capsys, out: Path) -> tuple[dict, list[dict]]:
    """Run eval with --json and --out: (its JSON line, predictions.jsonl's rows)."""
    capsys.readouterr()
    assert main([*argv, "--dtype", "float32", "--json", "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    return line, rows


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    """The working directory, with the reward file: a relative --reward resolves in it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rewards.py").write_text(REWARDS)
    return tmp_path


def _greedy(tiny_dir: Path, base: Path) -> tuple[list[str], list[int]]:
    """The reference: the prompts rendered as GRPO renders them, one generate_batch; each
    reply's text and its length in tokens, the stop token counted where one ended it."""
    tok = Tokenizer(tiny_dir)
    model = load_model(tiny_dir, dtype=torch.float32).eval()
    rows = [Record(f"p:{i}", {"prompt": p}) for i, p in enumerate(PROMPTS)]
    ids = [rl_prompt(r, tok, None, {"base": base}).ids for r in rows]
    with torch.no_grad():
        got = generate_batch(
            model, ids, max_new_tokens=TOKENS, stop_ids=tok.stop_ids(), pad_id=tok.pad_id
        )
    return [tok.decode(g) for g in got], [len(g) + (len(g) < TOKENS) for g in got]


def test_greedy_scores_equal_a_hand_computation(here, tiny_dir, capsys):
    texts, lengths = _greedy(tiny_dir, here)
    expected = [texts[0], "not what it says", texts[2], None]  # None: exact does not apply
    data = _rows(
        here / "p.jsonl", [{"prompt": p, "want": w} for p, w in zip(PROMPTS, expected, strict=True)]
    )
    argv = ["eval", str(tiny_dir), "--data", str(data), "--metric", "reward"]
    argv += [
        "--reward",
        "rewards.py:n_ids",
        "--reward",
        "exact:want",
        "--reward",
        "rewards.py:as_chat",
    ]
    line, rows = _eval([*argv, "--max-new-tokens", str(TOKENS)], capsys, here / "out")

    chat = [float(isinstance(p, list)) for p in PROMPTS]
    exact = [1.0, 0.0, 1.0, 0.0]  # the last row's None adds nothing to its total
    totals = [n + c + e for n, c, e in zip(lengths, chat, exact, strict=True)]
    scores = line["rewards"][str(tiny_dir)]
    assert line["metric"] == "reward" and line["n"] == 4
    assert scores["rewards/n_ids"] == pytest.approx(sum(lengths) / 4)
    assert scores["rewards/exact:want"] == pytest.approx(2 / 3)  # the None row left out
    assert scores["rewards/as_chat"] == pytest.approx(1 / 4)
    assert scores["reward"] == pytest.approx(sum(totals) / 4)
    assert line["scores"][str(tiny_dir)] == scores["reward"]
    assert not any(k.startswith("best_of") for k in scores)  # one completion per prompt

    assert [r["prompt"] for r in rows] == PROMPTS and rows[0]["columns"] == {"want": texts[0]}
    got = [r["targets"][str(tiny_dir)] for r in rows]
    assert [g["completions"][0]["text"] for g in got] == texts
    assert [g["completions"][0]["tokens"] for g in got] == lengths
    assert got[3]["completions"][0]["rewards"]["exact:want"] is None
    assert [g["reward"] for g in got] == pytest.approx(totals)
    summary = json.loads((here / "out" / "summary.json").read_text())
    assert summary["reward"]["samples"] is None and summary["reward"]["max_new_tokens"] == TOKENS


def test_samples_repeat_for_a_seed_and_best_of_k_is_the_best(here, tiny_dir, capsys):
    data = _rows(here / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    argv = ["eval", str(tiny_dir), "--data", str(data), "--metric", "reward"]
    argv += ["--reward", "rewards.py:ids_mod_7", "--samples", "3", "--max-new-tokens", "12"]
    argv += ["--temperature", "1.5"]
    a, rows_a = _eval([*argv, "--seed", "1"], capsys, here / "a")
    b, rows_b = _eval([*argv, "--seed", "1", "--batch-size", "1"], capsys, here / "b")
    c, rows_c = _eval([*argv, "--seed", "2"], capsys, here / "c")

    def texts(rows):
        return [[x["text"] for x in r["targets"][str(tiny_dir)]["completions"]] for r in rows]

    assert all(len(t) == 3 for t in texts(rows_a))
    assert texts(rows_a) == texts(rows_b) and a == b  # batching does not change a draw
    assert texts(rows_a) != texts(rows_c)
    scores = a["rewards"][str(tiny_dir)]
    totals = [[x["reward"] for x in r["targets"][str(tiny_dir)]["completions"]] for r in rows_a]
    assert scores["reward"] == pytest.approx(sum(map(sum, totals)) / 12)
    assert scores["best_of_3"] == pytest.approx(sum(map(max, totals)) / 4)
    assert scores["best_of_3"] >= scores["reward"]
    assert len({x for t in totals for x in t}) > 1  # the draws differ, so the test means something
    assert not math.isnan(scores["best_of_3"])


def test_mistakes_are_refused_in_one_line(here, tiny_dir, capsys):
    prompts = _rows(here / "p.jsonl", [{"prompt": "hi", "answer": "x"}])
    chats = chat_set(here / "chats.jsonl", n=2, seed=1)
    out = here / "out"
    base = ["eval", str(tiny_dir), "--data", str(prompts), "--out", str(out)]
    reward = [*base, "--metric", "reward", "--reward", "rewards.py:n_ids"]

    def refused(argv, *needles):
        refused_in_one_line(capsys, argv, *needles)
        assert not out.exists()

    refused([*base, "--reward", "json_valid"], "--reward applies to --metric reward")
    refused([*base, "--samples", "4"], "--samples applies to --metric reward")
    refused([*base, "--metric", "reward"], "needs --reward SPEC")
    refused([*reward, "--metric", "exact"], "prompt-only rows", "two evals")
    refused([*reward, "--seed", "3"], "--seed applies to sampling", "--samples K")
    refused([*reward, "--samples", "0"], "--samples 0")
    refused([*reward, "--samples", "2", "--temperature", "0"], "above 0")
    refused([*reward, "--backend", "llama.cpp"], "drop --backend llama.cpp")
    refused([*base, "--metric", "reward", "--reward", "missing.py:f"], "no file")
    refused([*base, "--metric", "reward", "--reward", "rewards.py:nope"], "has no 'nope'")
    chat = [
        "eval",
        str(tiny_dir),
        "--data",
        str(chats),
        "--metric",
        "reward",
        "--reward",
        "json_valid",
    ]
    refused(chat, "chats.jsonl:1", "ends on a reply", "--metric exact")
