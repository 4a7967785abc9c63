"""GRPO reward functions: load a recipe's `rewards:` list and score a batch with it.

Rewards are TRL's (`fn(prompts, completions, completion_ids, **columns) -> list[float | None]`),
so a file written for TRL's GRPOTrainer works unchanged; the common checks (JSON, the answer, a
format, a tool call, DAPO's length penalty) are built in by name. A missing file, a bad
signature or a function that raises or returns the wrong thing is refused in one line naming
the reward and the data row, not found as NaNs or a stack trace a hundred steps into a run.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemma3_tune.errors import UserError

if TYPE_CHECKING:
    import torch

_NOT_JSON = object()  # what _json_of returns for text that does not parse
_FENCE = re.compile(r"```(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```", re.DOTALL)


@dataclass(frozen=True)
class RewardFunction:
    name: str  # TRL's reward_func_names: the function's __name__ (built-ins: their spec string)
    fn: Callable[..., list]  # fn(prompts, completions, completion_ids, **columns) -> list

    @property
    def __name__(self) -> str:  # so TRL's get_callable_name() logs it under `name`
        return self.name

    def __call__(self, prompts: list, completions: list, completion_ids: list, **columns: Any):
        return self.fn(
            prompts=prompts, completions=completions, completion_ids=completion_ids, **columns
        )


# --- built-ins: fn(completions, ..., **kwargs) -> list[float | None] --------------------------


def _text(completion: Any) -> str:
    """The completion's text: a string as is, or the last assistant message's content."""
    if isinstance(completion, str):
        return completion
    for message in reversed(completion):
        if message.get("role") == "assistant":
            content = message.get("content") or ""
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                return "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content)
    return ""


def _json_of(text: str) -> Any:
    """The JSON value of the stripped text, or of the ```json block that is all of it."""
    text = text.strip()
    fenced = _FENCE.fullmatch(text)
    try:
        return json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return _NOT_JSON


def _canon(value: Any) -> str:
    """One spelling per JSON value, so {"a": 1, "b": 2} equals {"b": 2, "a": 1}."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _by_column(completions: list, *, check: Callable, column: str, **kwargs: Any) -> list:
    """`check(text, reference)` for each row; a row whose reference is None gets None (no reward)."""
    if column not in kwargs:
        have = ", ".join(sorted(set(kwargs) - {"prompts", "completion_ids"})) or "none"
        raise LookupError(f"the data has no column {column!r} (it has: {have})")
    pairs = zip(completions, kwargs[column], strict=True)
    return [None if ref is None else check(_text(c), ref) for c, ref in pairs]


def _json_valid(completions: list, **kwargs: Any) -> list[float]:
    return [float(_json_of(_text(c)) is not _NOT_JSON) for c in completions]


def _json_match(text: str, ref: Any) -> float:
    """The share of the reference's top-level keys whose value the completion's object equals."""
    ref, got = _json_of(ref) if isinstance(ref, str) else ref, _json_of(text)
    if not isinstance(ref, dict):
        raise ValueError(f"the reference must be a JSON object (or its text), not {ref!r:.40}")
    if not isinstance(got, dict) or not ref:
        return float(got == ref)
    return sum(k in got and _canon(got[k]) == _canon(v) for k, v in ref.items()) / len(ref)


def _json_equal(text: str, ref: Any) -> float:
    """1 when the completion's JSON equals the reference exactly (eval's `json` metric): no
    partial credit, so leaving a hard field out never pays (json_match's 3 of 4 keys does)."""
    ref = _json_of(ref) if isinstance(ref, str) else ref
    return float(_canon(_json_of(text)) == _canon(ref)) if _json_of(text) is not _NOT_JSON else 0.0


def _exact(text: str, ref: Any) -> float:
    return float(text.strip() == str(ref).strip())


def _contains(text: str, ref: Any) -> float:
    return float(str(ref) in text)


def _regex(completions: list, *, pattern: re.Pattern, **kwargs: Any) -> list[float]:
    return [float(pattern.fullmatch(_text(c).strip()) is not None) for c in completions]


def _call_of(value: Any) -> tuple[Any, str] | None:
    """(name, canonical arguments) of `{"name", "arguments"}` or OpenAI's `{"function": {...}}`."""
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = value["function"]
    if not isinstance(value, dict) or "name" not in value:
        return None
    args = value.get("arguments", {})
    parsed = _json_of(args) if isinstance(args, str) else args  # OpenAI sends JSON text
    return value["name"], _canon(args if parsed is _NOT_JSON else parsed)


def _tool_call(text: str, ref: Any) -> float:
    """1.0 for the expected call, 0.5 for the right function with other arguments, else 0.0.

    The completion text is read as one JSON call `{"name": ..., "arguments": {...}}` (a ```json
    fence is unwrapped), not as the chat template's tool-call markup: GRPO scores raw sampled
    text, and a JSON object is what any prompt can ask any model for. OpenAI's `{"function":
    {...}}` wrapper and arguments written as JSON text are accepted on both sides.
    """
    want = _call_of(_json_of(ref) if isinstance(ref, str) else ref)
    got = _call_of(_json_of(text))
    if want is None:
        raise ValueError('the reference must be a call {"name": ..., "arguments": {...}}')
    if got is None or got[0] != want[0]:
        return 0.0
    return 1.0 if got[1] == want[1] else 0.5


def _overlong(completion_ids: list, *, max_len: int, cache: int, **kwargs: Any) -> list[float]:
    """DAPO's soft overlong punishment (eq. 13), equal to TRL's get_soft_overlong_punishment."""
    soft, lengths = max_len - cache, [len(ids) for ids in completion_ids]
    return [0.0 if n <= soft else -1.0 if n > max_len else (soft - n) / cache for n in lengths]


# --- loading ---------------------------------------------------------------------------------

_BUILTINS = "json_valid json_match:COLUMN json_equal:COLUMN exact:COLUMN contains:COLUMN"
_BUILTINS += " regex:PATTERN"
_BUILTINS += " tool_call:COLUMN overlong:MAX:CACHE"
_CHECKS = dict(
    json_match=_json_match, json_equal=_json_equal, exact=_exact, contains=_contains,
    tool_call=_tool_call,
)  # fmt: skip


def _builtin(spec: str) -> Callable:
    kind, _, arg = spec.partition(":")
    fail = f"reward {spec!r}: "
    if kind == "json_valid":
        if arg:
            raise UserError(fail + "json_valid takes no argument; write json_valid")
        return _json_valid
    if not arg:
        raise UserError(fail + f"say what it checks, e.g. {kind}:answer (see {_BUILTINS})")
    if kind in _CHECKS:
        return functools.partial(_by_column, check=_CHECKS[kind], column=arg)
    if kind == "regex":
        try:
            return functools.partial(_regex, pattern=re.compile(arg, re.DOTALL))
        except re.error as e:
            raise UserError(fail + f"bad regular expression ({e}); fix the pattern") from None
    max_len, _, cache = arg.partition(":")
    if not (max_len.isdigit() and cache.isdigit() and int(cache) <= int(max_len)):
        raise UserError(fail + "write overlong:MAX:CACHE, whole numbers with CACHE <= MAX")
    return functools.partial(_overlong, max_len=int(max_len), cache=int(cache))


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"  # on one line


def _import(spec: str, what: str, run: Callable[[], Any]) -> Any:
    """`run()`; an exception while importing the user's code is refused in one line."""
    try:
        return run()
    except Exception as e:
        fix = "; install it or give file.py:function" if isinstance(e, ModuleNotFoundError) else ""
        raise UserError(f"reward {spec!r}: importing {what} raised {_why(e)}{fix}") from None


def _from_file(spec: str, file: str, base: Path) -> Any:
    path = base / Path(file).expanduser()  # an absolute path stays as it is
    if not path.is_file():
        raise UserError(
            f"reward {spec!r}: no file {path}; give a path relative to where you run gemma3-tune, as data paths are"
        )
    stat = path.stat()  # a file edited since it was loaded is loaded again
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    name = f"gemma3_tune_reward_{path.stem}_{abs(hash(key))}"
    if name in sys.modules:  # loaded by the refusal check already: run the file once
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(module_spec)  # for pickling
    sys.path.insert(0, str(path.parent))  # so the file can import its neighbours
    try:
        _import(spec, str(path), lambda: module_spec.loader.exec_module(module))
    except UserError:
        del sys.modules[name]  # not half a module for the next load
        raise
    finally:
        sys.path.remove(str(path.parent))
    return module


def _check_signature(spec: str, fn: Any) -> None:
    """Refuse what TRL's call `fn(prompts=, completions=, completion_ids=, **columns)` breaks."""
    if not callable(fn):
        raise UserError(f"reward {spec!r} is a {type(fn).__name__}, not a function; name a def")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return  # a C callable without a signature: the call will tell
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    if var_kw or {"prompts", "completions", "completion_ids"} <= named:
        return
    fix = "define it as def f(prompts, completions, completion_ids, **kwargs)"
    raise UserError(f"reward {spec!r} cannot take TRL's call; {fix}")


def _load_one(spec: str, base: Path) -> RewardFunction:
    if spec.partition(":")[0] in {b.partition(":")[0] for b in _BUILTINS.split()}:
        return RewardFunction(spec, _builtin(spec))
    where, _, attr = spec.rpartition(":")
    if where.endswith(".py"):
        module = _from_file(spec, where, base)
    elif where and attr:
        module = _import(spec, where, lambda: importlib.import_module(where))
    else:
        forms = f"a built-in ({_BUILTINS}), a file.py:function or a package.module:function"
        raise UserError(f"reward {spec!r} is not {forms}")
    if not hasattr(module, attr):
        raise UserError(f"reward {spec!r}: {where} has no {attr!r}; check the function's name")
    fn = getattr(module, attr)
    _check_signature(spec, fn)
    return RewardFunction(getattr(fn, "__name__", type(fn).__name__), fn)  # as TRL names it


def load_rewards(specs: list[str], base: Path) -> list[RewardFunction]:
    """The reward functions a recipe names; relative files resolve in `base` (the working
    directory, as data paths do)."""
    return [_load_one(spec, Path(base)) for spec in specs]


# --- scoring ---------------------------------------------------------------------------------


def completion_texts(tok, prompts: list, completions: list[list[int]]) -> tuple[list, list[str]]:
    """Completions as TRL gives them to reward functions: text, or for a conversational prompt
    `[{"role": "assistant", "content": text}]`; and the texts. `completions` are ids (stop
    tokens dropped here), prompt-major: prompt b's k-th at b * G + k; `prompts` have
    `.conversational` (data/rl_prompts.RLPrompt)."""
    group = len(completions) // len(prompts)
    stops = tok.stop_ids()
    texts = [tok.decode([t for t in c if t not in stops]) for c in completions]
    out = [
        [{"role": "assistant", "content": t}] if prompts[i // group].conversational else t
        for i, t in enumerate(texts)
    ]
    return out, texts


def _value(reward: RewardFunction, value: Any, origin: str) -> float:
    """One returned value as a float: None -> NaN (TRL: no reward), bool -> 1.0 / 0.0."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # numpy and torch scalars
    if value is None:
        return math.nan
    if isinstance(value, (int, float)) and not math.isinf(value):
        return float(value)
    got, fix = " ".join(repr(value).split())[:60], "return a finite number, a bool or None"
    raise UserError(f"reward {reward.name} gave {got} for row {origin}; {fix}")


def _call(reward: RewardFunction, kwargs: dict, n: int, first: str) -> list:
    """The function's values for the batch, refused unless a list of one per completion."""
    at = f"batch starting at row {first}"
    try:
        out = reward.fn(**kwargs)
    except Exception as e:
        raise UserError(f"reward {reward.name} raised {_why(e)} ({at})") from None
    if not isinstance(out, (list, tuple)):
        got = f"a {type(out).__name__}"
    elif len(out) != n:
        got = f"{len(out)} values for {n} completions"
    else:
        return list(out)
    raise UserError(f"reward {reward.name} returned {got} ({at}); return a list, one per row")


def score(
    rewards: list[RewardFunction],
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    columns: list[dict],
    origins: list[str],
) -> torch.Tensor:
    """[N, F] float32 rewards, one column per function, NaN where a function returned None.

    Each function is called once with the whole batch, as TRL's GRPOTrainer calls it. `columns`
    holds each completion's prompt row (its other columns), `origins` its "file:line".
    """
    import torch

    n = len(completions)
    if not len(prompts) == len(completion_ids) == len(columns) == len(origins) == n:
        raise ValueError("score: prompts, completions, completion_ids, columns, origins differ")
    kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids}
    kwargs |= {key: [col.get(key) for col in columns] for key in (columns[0] if columns else {})}
    table = []  # [F][N]
    for reward in rewards:
        out = _call(reward, kwargs, n, origins[0] if origins else "(none)")
        table.append([_value(reward, v, origin) for v, origin in zip(out, origins, strict=True)])
    return torch.tensor(table, dtype=torch.float32).reshape(len(rewards), n).T.contiguous()
