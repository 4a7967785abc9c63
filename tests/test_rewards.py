"""GRPO rewards: the built-ins' numbers, TRL's overlong penalty, loading user code, the refusals."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
from trl.rewards import get_soft_overlong_punishment
from trl.trainer.utils import get_callable_name

from gemma3_tune.errors import UserError
from gemma3_tune.train.rewards import RewardFunction, load_rewards, score

HERE = Path(__file__).parent


def _chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _run(spec: str, completions: list, refs: list | None = None, column: str = "ref") -> list:
    """One built-in over a batch, through score(): the row's value, NaN where it gave None."""
    n = len(completions)
    columns = [{column: r} for r in refs] if refs is not None else [{} for _ in range(n)]
    ids = [[0] * 3 for _ in range(n)]
    origins = [f"data.jsonl:{i + 1}" for i in range(n)]
    table = score(load_rewards([spec], HERE), ["q"] * n, completions, ids, columns, origins)
    assert table.shape == (n, 1) and table.dtype == torch.float32
    return table[:, 0].tolist()


def _refusal(call, *args) -> str:
    with pytest.raises(UserError) as err:
        call(*args)
    message = str(err.value)
    assert "\n" not in message, message
    return message


# --- built-ins ---------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [str, _chat], ids=["text", "chat"])
def test_json_valid(wrap):
    texts = ['{"a": 1}', '  ```json\n{"a": [1, 2]}\n```  ', "```\n[1, 2]\n```", "[1, 2]"]
    texts += ['{"a": 1', 'Sure! {"a": 1}', "```json\n{'a': 1}\n```", ""]
    assert _run("json_valid", [wrap(t) for t in texts]) == [1, 1, 1, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("wrap", [str, _chat], ids=["text", "chat"])
@pytest.mark.parametrize("as_text", [False, True], ids=["dict", "json-text"])
def test_json_match_partial_credit(wrap, as_text):
    ref = {"name": "Ada", "year": 1815, "tags": ["math", "poetry"]}
    reference = '{"name": "Ada", "year": 1815, "tags": ["math", "poetry"]}' if as_text else ref
    texts = [
        '{"tags": ["math", "poetry"], "year": 1815, "name": "Ada"}',  # same, other order
        '```json\n{"name": "Ada", "year": 1815, "tags": ["math", "poetry"], "extra": 1}\n```',
        '{"name": "Ada", "year": 1816, "tags": ["math", "poetry"]}',
        '{"name": "Ada"}',
        '{"name": "ada", "tags": ["poetry", "math"]}',
        '["Ada", 1815]',
        "Ada, 1815",
    ]
    got = _run("json_match:ref", [wrap(t) for t in texts], [reference] * len(texts))
    assert got == pytest.approx([1.0, 1.0, 2 / 3, 1 / 3, 0.0, 0.0, 0.0])


def test_json_match_types_and_nested_values():
    ref = {"n": 1, "flag": True, "obj": {"x": [1, {"y": None}]}}
    texts = ['{"n": 1, "flag": true, "obj": {"x": [1, {"y": null}]}}', '{"n": true, "flag": 1}']
    assert _run("json_match:ref", texts, [ref, ref]) == pytest.approx([1.0, 0.0])
    assert _run("json_match:ref", ["{}", '{"a": 1}'], [{}, {}]) == [1.0, 0.0]


def test_json_equal_gives_no_partial_credit():
    ref = {"name": "Ada", "year": 1815}
    texts = ['{"year": 1815, "name": "Ada"}', '{"name": "Ada"}', '{"name": "Ada", "year": 1815,'
             ' "x": 1}', '{"name": "Ada", "year": 1815} and more', "not json"]  # fmt: skip
    assert _run("json_equal:ref", texts, [ref] * 5) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert _run("json_equal:ref", [_chat('{"name": "Ada", "year": 1815}')], [ref]) == [1.0]


@pytest.mark.parametrize("wrap", [str, _chat], ids=["text", "chat"])
def test_exact_and_contains(wrap):
    texts = [" 42 \n", "42.", "The answer is 42.", "4 2"]
    assert _run("exact:answer", [wrap(t) for t in texts], [42] * 4, "answer") == [1, 0, 0, 0]
    assert _run("contains:answer", [wrap(t) for t in texts], ["42"] * 4, "answer") == [1, 1, 1, 0]
    assert _run("exact:answer", [wrap("x ")], [" x"], "answer") == [1.0]


def test_column_builtins_skip_rows_without_a_reference():
    got = _run("exact:answer", ["a", "a", "a"], ["a", None, "b"], "answer")
    assert got[0] == 1.0 and math.isnan(got[1]) and got[2] == 0.0


@pytest.mark.parametrize("wrap", [str, _chat], ids=["text", "chat"])
def test_regex_is_a_full_match_over_lines(wrap):
    spec = r"regex:<think>.*</think>\s*Answer: \d+"
    texts = ["<think>a\nb\n</think>\nAnswer: 7\n", "Answer: 7", "<think>a</think> Answer: 7 then"]
    assert _run(spec, [wrap(t) for t in texts]) == [1.0, 0.0, 0.0]
    assert _run("regex:a:b", ["a:b"]) == [1.0]  # the pattern may hold colons


@pytest.mark.parametrize("wrap", [str, _chat], ids=["text", "chat"])
def test_tool_call(wrap):
    call = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}
    texts = [
        '{"name": "get_weather", "arguments": {"unit": "C", "city": "Paris"}}',
        '```json\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n```',
        '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}',
        '{"name": "get_time", "arguments": {"city": "Paris", "unit": "C"}}',
        "get_weather(city='Paris')",
        '[{"name": "get_weather"}]',
    ]
    got = _run("tool_call:call", [wrap(t) for t in texts], [call] * len(texts), "call")
    assert got == [1.0, 1.0, 0.5, 0.0, 0.0, 0.0]


def test_tool_call_accepts_openai_calls_and_json_text():
    openai = {"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    text = '{"name": "f", "arguments": {"x": 1}}'
    assert _run("tool_call:c", [text, text], [openai, text], "c") == [1.0, 1.0]
    other_args = '{"function": {"name": "f", "arguments": "{}"}}'
    assert _run("tool_call:c", [other_args], [text], "c") == [0.5]


@pytest.mark.parametrize(("max_len", "cache"), [(100, 20), (16, 16), (10, 0), (7, 3)])
def test_overlong_equals_trl(max_len, cache):
    ids = [[1] * n for n in range(0, max_len + 25)]
    ours = load_rewards([f"overlong:{max_len}:{cache}"], HERE)[0]
    trl = get_soft_overlong_punishment(max_completion_len=max_len, soft_punish_cache=cache)
    expected = trl(completion_ids=ids)
    assert ours(["q"] * len(ids), ["c"] * len(ids), ids) == expected
    assert expected[max_len + 1] == -1.0  # the range reaches past MAX


def test_overlong_values():
    ids = [[0] * n for n in (80, 90, 100, 101)]
    table = score(
        load_rewards(["overlong:100:20"], HERE), [""] * 4, [""] * 4, ids, [{}] * 4, ["a"] * 4
    )
    assert table[:, 0].tolist() == [0.0, -0.5, -1.0, -1.0]


def test_builtin_names_and_trl_call():
    rewards = load_rewards(["json_match:answer", "overlong:8:4", "regex:a+"], HERE)
    assert [r.name for r in rewards] == ["json_match:answer", "overlong:8:4", "regex:a+"]
    assert [get_callable_name(r) for r in rewards] == [r.name for r in rewards]
    back = pickle.loads(pickle.dumps(rewards))  # TRL's async rollouts pickle reward functions
    kwargs = dict(prompts=["q"], completions=['{"a": 1}'], completion_ids=[[1] * 6])
    assert [r(**kwargs, answer=[{"a": 1}]) for r in back] == [[1.0], [-0.5], [0.0]]


# --- user functions ----------------------------------------------------------------------------

USER_FILE = """
def fn(prompts, completions, completion_ids, **kwargs):
    return [float(len(c)) for c in completions]

def maybe(completions, **kwargs):
    return [None if a is None else a == c for c, a in zip(completions, kwargs["answer"])]
"""


def test_user_file_relative_absolute_and_module(tmp_path, monkeypatch):
    (tmp_path / "r.py").write_text(USER_FILE)
    pkg = tmp_path / "lib" / "myrewards_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "checks.py").write_text(USER_FILE)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    specs = ["r.py:fn", f"{tmp_path / 'r.py'}:maybe", "myrewards_pkg.checks:maybe", "exact:answer"]
    rewards = load_rewards(specs, tmp_path)
    assert [r.name for r in rewards] == ["fn", "maybe", "maybe", "exact:answer"]
    columns = [{"answer": "ab"}, {"answer": None}, {"answer": "x"}]
    table = score(rewards, ["p"] * 3, ["ab", "c", "de"], [[1], [2], [3]], columns, ["d:1"] * 3)
    nan = math.nan
    expected = [[2.0, 1.0, 1.0, 1.0], [1.0, nan, nan, nan], [2.0, 0.0, 0.0, 0.0]]
    assert torch.allclose(table, torch.tensor(expected), equal_nan=True)


def test_user_file_sees_its_neighbours_and_every_column(tmp_path):
    (tmp_path / "helper.py").write_text("BONUS = 0.25\n")
    (tmp_path / "r.py").write_text(
        "from helper import BONUS\nseen = []\n"
        "def fn(prompts, completions, completion_ids, **kw):\n"
        "    seen.append((prompts, completions, completion_ids, kw))\n"
        "    return [BONUS] * len(completions)\n"
    )
    (reward,) = load_rewards(["r.py:fn"], tmp_path)
    prompts = [[{"role": "user", "content": "hi"}]] * 2
    completions = [_chat("a"), _chat("b")]
    columns = [{"answer": 1, "id": "x"}, {"answer": 1, "id": "x"}]
    table = score([reward], prompts, completions, [[5], [6, 7]], columns, ["d:1", "d:1"])
    assert table.tolist() == [[0.25], [0.25]]
    seen = reward.fn.__globals__["seen"]
    assert seen == [(prompts, completions, [[5], [6, 7]], {"answer": [1, 1], "id": ["x", "x"]})]


def test_values_numpy_bool_and_nan(tmp_path):
    (tmp_path / "r.py").write_text(
        "import numpy as np, torch\n"
        "def fn(prompts, completions, completion_ids, **kw):\n"
        "    return [True, False, None, np.float32(0.5), torch.tensor(2), 3]\n"
    )
    table = score(load_rewards(["r.py:fn"], tmp_path), *_batch(6))
    assert torch.allclose(
        table[:, 0], torch.tensor([1.0, 0.0, math.nan, 0.5, 2.0, 3.0]), equal_nan=True
    )


def _batch(n: int) -> tuple:
    return (
        ["p"] * n,
        ["c"] * n,
        [[1]] * n,
        [{"answer": "a"}] * n,
        [f"d.jsonl:{i + 10}" for i in range(n)],
    )


def test_empty_reward_list_gives_an_empty_matrix():
    assert score([], *_batch(3)).shape == (3, 0)


def test_reward_function_call_is_trls():
    reward = RewardFunction("f", lambda prompts, completions, completion_ids, **kw: [len(kw)])
    assert reward(["p"], ["c"], [[1]], a=[1], b=[2]) == [2]
    assert reward.__name__ == "f"


# --- refusals ----------------------------------------------------------------------------------


def test_load_refusals(tmp_path):
    (tmp_path / "r.py").write_text(
        "CONST = 3\n"
        "def positional(a, b):\n    return []\n"
        "def no_ids(prompts, completions):\n    return []\n"
    )
    (tmp_path / "broken.py").write_text("import json\nraise RuntimeError('boom\\nsecond line')\n")
    (tmp_path / "syntax.py").write_text("def f(:\n")
    cases = {
        "missing.py:fn": ["missing.py:fn", "no file", "relative to where you run"],
        "r.py:nope": ["r.py:nope", "has no 'nope'"],
        "r.py:CONST": ["r.py:CONST", "not a function"],
        "r.py:positional": ["r.py:positional", "cannot take TRL's call", "**kwargs"],
        "r.py:no_ids": ["r.py:no_ids", "cannot take TRL's call"],
        "broken.py:fn": ["broken.py:fn", "RuntimeError: boom second line"],
        "syntax.py:f": ["syntax.py:f", "SyntaxError"],
        "no_such_module_xyz.sub:fn": ["no_such_module_xyz", "ModuleNotFoundError"],
        "nope": ["'nope'", "json_valid", "json_match:COLUMN", "overlong:MAX:CACHE"],
        "exact": ["'exact'", "exact:answer"],
        "json_valid:x": ["json_valid:x", "no argument"],
        "regex:(a": ["regex:(a", "bad regular expression"],
        "overlong:10": ["overlong:10", "overlong:MAX:CACHE"],
        "overlong:5:10": ["overlong:5:10", "CACHE <= MAX"],
        "overlong:a:1": ["overlong:a:1", "whole numbers"],
    }
    for spec, parts in cases.items():
        message = _refusal(load_rewards, ["json_valid", spec], tmp_path)
        assert all(p in message for p in parts), (spec, message)


USER_BAD = """
def raises(completions, **kw):
    raise ValueError("bad\\nrow")

def short(completions, **kw):
    return [1.0]

def not_a_list(completions, **kw):
    return 1.0

def text_value(completions, **kw):
    return [0.0, "1.0", 0.0]

def infinite(completions, **kw):
    return [0.0, 0.0, float("inf")]

def no_kwargs(prompts, completions, completion_ids):
    return [0.0] * len(completions)
"""


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("raises", ["raises", "ValueError: bad row", "d.jsonl:10"]),
        ("short", ["short", "1 values for 3 completions", "d.jsonl:10"]),
        ("not_a_list", ["not_a_list", "returned a float", "d.jsonl:10"]),
        ("text_value", ["text_value", "'1.0'", "row d.jsonl:11"]),
        ("infinite", ["infinite", "inf", "row d.jsonl:12"]),
        ("no_kwargs", ["no_kwargs", "TypeError", "answer", "d.jsonl:10"]),
    ],
)
def test_score_refusals(tmp_path, name, parts):
    (tmp_path / "bad.py").write_text(USER_BAD)
    rewards = load_rewards(["json_valid", f"bad.py:{name}"], tmp_path)
    message = _refusal(score, rewards, *_batch(3))
    assert all(p in message for p in parts), message


def test_builtin_refusals_name_the_column():
    message = _refusal(score, load_rewards(["exact:solution"], HERE), *_batch(2))
    assert "exact:solution" in message and "'solution'" in message and "answer" in message
    rewards = load_rewards(["json_match:answer"], HERE)
    message = _refusal(score, rewards, *_batch(2))  # the column holds "a", not a JSON object
    assert "json_match:answer" in message and "JSON object" in message and "d.jsonl:10" in message
