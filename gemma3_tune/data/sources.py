"""Reading chat data and checking every sample, with errors that name the file and line.

Formats, one object per line (JSONL), or a JSON array, or a table (Parquet, Arrow,
`datasets.save_to_disk` folder), told apart by their keys:
- `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": STR | [PART, ...]}]}`
  with PART = `{"type": "text", "text": STR}` or `{"type": "image", "image": IMAGE}`; TRL's
  `{"type": "image"}` placeholders take the top-level `"images": [IMAGE, ...]` in order;
  OpenAI tool calling: top-level `"tools"`, assistant `"tool_calls"`, `"tool"` messages;
- ShareGPT: `{"conversations": [{"from": "human"|"gpt"|"system", "value": STR}], "images": [IMAGE]}`
  with `<image>` marking where each image goes; LLaMA-Factory's `function_call` and
  `observation` turns and `"tools"` (a JSON string) for tool calling;
- Alpaca: `{"instruction": STR, "input": STR, "output": STR, "system": STR, "history": [[q, a]]}`
  (`input`, `system`, `history` optional; the user turn is instruction + "\n" + input);
- raw text, `{"text": STR}`, and TRL's prompt-completion rows, `{"prompt", "completion"}`, are
  read here too but are documents, not chats (documents.py); a `.txt` file, or a folder of
  them, is one `{"text": ...}` record per file;
- TRL prompt-only, for a teacher to answer (`distill:`; refused elsewhere):
  `{"prompt": [{"role": "user", "content": "Why is the sky blue?"}]}` or `{"prompt": "Why is the
  sky blue?"}` (a string is one user message, rendered in the chat template).
A conversation that ends on the user's turn is a prompt too when the caller opts in
(`to_turns(..., allow_prompt_only=True)`): `data/answers.py` appends the teacher's reply.
IMAGE is a path, or `{"bytes": ..., "path": ...}` as `datasets.Image()` stores one (bytes are
written once to the prepared-data cache, named by their hash).

JSON and JSONL are read by us, a line at a time (lazily, so files larger than memory stream):
that is what lets an error name its line, and lets `content` be a string on one line and a
list on the next (Arrow-based readers need one schema for the whole file). Parquet, Arrow and
`save_to_disk` folders go through `datasets`, and errors name the row.

Each format's reading into turns is in formats.py, an image's path and views in image_refs.py;
here are the readers and `to_turns`, which picks the format and checks the turns' order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from .formats import (
    DISTILL_HINT,
    FORMATS,
    PAIRED_KEYS,
    Ctx,
    declared_tools,
    from_alpaca,
    from_messages,
    from_prompt,
    from_sharegpt,
)
from .records import Record, SampleError
from .template import ToolCall, Tools, Turn


def read_records(path: str | os.PathLike) -> Iterator[Record]:
    """Yield every record of a source; broken lines become SampleErrors (raised lazily)."""
    path = Path(path)
    if not path.exists():
        raise SampleError(str(path), "no such file or folder; check data.train / data.eval")
    if path.suffix == ".txt" or (path.is_dir() and _text_folder(path)):
        yield from _read_text(path)
        return
    if path.is_dir() or path.suffix in (".parquet", ".arrow"):
        yield from _read_table(path)
        return
    if path.suffix == ".json":
        yield from _read_json_array(path)
        return
    if path.suffix not in (".jsonl", ".ndjson"):
        raise SampleError(
            str(path),
            f"unsupported data file type {path.suffix or '(none)'!r}; use .jsonl, .json,"
            " .parquet, .arrow, .txt (raw text), a folder of .txt files or a"
            " datasets.save_to_disk folder",
        )
    yield from read_jsonl(path)


def read_jsonl(
    path: Path, start: int = 0, end: int | None = None, first_line: int = 1
) -> Iterator[Record]:
    """Lines of a JSONL file; with `start`/`end` (byte offsets at line starts) only that part,
    whose first line is line `first_line` (parallel preparation reads a file in such parts)."""
    any_line = False
    whole = start == 0 and (end is None or end >= path.stat().st_size)
    with open(path, "rb") as f:
        f.seek(start)
        lineno = first_line - 1
        while end is None or f.tell() < end:
            raw = f.readline()
            if not raw:
                break
            lineno += 1
            origin = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Record(
                    origin,
                    SampleError(origin, f"not UTF-8 (byte {e.start}); re-save the file as UTF-8"),
                )
                continue
            if not line.strip():
                continue
            any_line = True
            line = line.rstrip("\r\n")  # columns count within the line, not into the next
            try:
                yield Record(origin, json.loads(line))
            except json.JSONDecodeError as e:
                yield Record(origin, SampleError(origin, _broken_json(e, line)))
    if whole and not any_line:
        raise SampleError(str(path), "empty file: no samples")


def _broken_json(e: json.JSONDecodeError, line: str) -> str:
    """ "broken JSON (why at column N): <the line's start>": the column is within the line."""
    start = line.strip()
    start = start if len(start) <= 60 else start[:57] + "..."
    return f"broken JSON ({e.msg} at column {e.colno}): {start}"


def _read_json_array(path: Path) -> Iterator[Record]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SampleError(
            str(path), f"not UTF-8 (byte {e.start}); re-save the file as UTF-8"
        ) from None
    if not text.strip():
        raise SampleError(str(path), "empty file: no samples")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # A .json file holding JSON Lines is common: read it as such.
        if e.msg == "Extra data":
            yield from read_jsonl(path)
            return
        lines = text.splitlines()
        line = lines[e.lineno - 1] if e.lineno <= len(lines) else ""
        raise SampleError(f"{path}:{e.lineno}", _broken_json(e, line)) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise SampleError(str(path), "expected a JSON array of samples or JSON Lines")
    for i, item in enumerate(data):
        yield Record(f"{path}:item {i}", item)


DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # save_to_disk's


def _text_folder(path: Path) -> bool:
    """A folder of .txt files (not a `save_to_disk` folder)."""
    return not any((path / f).exists() for f in DATASET_FILES) and any(path.rglob("*.txt"))


def _read_text(path: Path) -> Iterator[Record]:
    """Raw text: a .txt file is one document, `{"text": its contents}`; a folder, every .txt
    file under it in path order."""
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            yield Record(
                str(f), SampleError(str(f), f"not UTF-8 text (byte {e.start}); convert it")
            )
            continue
        yield Record(str(f), {"text": text})


def _read_table(path: Path) -> Iterator[Record]:
    import datasets

    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        else:
            kind = "parquet" if path.suffix == ".parquet" else "arrow"
            ds = datasets.load_dataset(kind, data_files=str(path), split="train", streaming=True)
    except Exception as e:  # datasets raises many types for unreadable files
        raise SampleError(
            str(path), f"cannot read as a dataset ({type(e).__name__}: {e})"
        ) from None
    if isinstance(ds, datasets.Dataset):
        ds = ds.to_iterable_dataset()
    ds = ds.decode(False)  # datasets.Image() columns as {"bytes", "path"}, not PIL images
    for i, row in enumerate(ds):
        yield Record(f"{path}:row {i}", row)


# ---------------------------------------------------------------------------------------------
# Checking one record into turns


def to_turns(
    record: Record,
    *,
    image_root: Path | None = None,
    pan_and_scan: bool = False,
    pas_args: dict | None = None,
    base: Path | None = None,
    image_store: Path | None = None,
    allow_prompt_only: bool = False,
) -> list[Turn]:
    """Validate one record and return its turns: system first (holding the tools, if any), then
    user/assistant alternating; an assistant turn holds its calls and their results.

    `allow_prompt_only`: also accept a conversation ending on a user turn with no assistant
    reply, and TRL's `{"prompt": ...}` rows (the caller has a teacher to answer them)."""
    origin, data = record.origin, record.data
    if isinstance(data, SampleError):
        raise data
    if not isinstance(data, dict):
        raise SampleError(origin, f"a sample must be a JSON object with {FORMATS}")
    ctx = Ctx(origin, image_root, base or Path("."), pan_and_scan, pas_args or {}, image_store)
    if data.get("messages") is not None:
        turns = from_messages(data["messages"], data.get("images"), ctx)
    elif data.get("conversations") is not None:
        turns = from_sharegpt(data, ctx)
    elif "instruction" in data and "output" in data:
        turns = from_alpaca(data, ctx)
    elif data.get("prompt") is not None and not PAIRED_KEYS & data.keys():
        turns = from_prompt(data, ctx, allow_prompt_only)
    elif "text" in data or {"prompt", "completion"} <= data.keys():
        what = "raw text" if "text" in data else "a prompt-completion row"
        raise SampleError(
            origin,
            f"{what}, not a chat or a prompt: only objective sft trains on it (continued"
            " pretraining, docs/pretraining.md)",
        )
    elif "chosen" in data or "rejected" in data:
        raise SampleError(
            origin,
            "a preference pair (TRL's prompt/chosen/rejected), not a chat; set objective: dpo"
            " (or orpo) to train on pairs",
        )
    else:
        keys = ", ".join(sorted(map(str, data))) or "none"
        raise SampleError(
            origin,
            f"no 'messages' or 'conversations' key (keys: {keys}); use {FORMATS}, or for"
            " continued pretraining 'text' (raw text) or 'prompt' + 'completion'",
        )
    tools = declared_tools(data.get("tools"), ctx)
    _check_order(turns, origin, allow_prompt_only)
    if tools is not None:
        _check_calls(turns, tools, ctx)
        if turns[0].role != "system":
            turns.insert(0, Turn("system", []))
        turns[0].parts.append(tools)
    return turns


def _check_calls(turns: list[Turn], tools: Tools, ctx: Ctx) -> None:
    """Every call names a declared function (when the sample declares any)."""
    declared = {t["name"] for t in tools.declarations}
    for t in turns:
        for p in t.parts:
            if isinstance(p, ToolCall) and p.name not in declared:
                raise ctx.error(
                    f"calls {p.name!r}, which 'tools' does not declare ({', '.join(sorted(declared))})"
                )


def _check_order(turns: list[Turn], origin: str, allow_prompt_only: bool = False) -> None:
    body = turns[1:] if turns[0].role == "system" else turns
    if any(t.role == "system" for t in body):
        raise SampleError(origin, "a system message may only come first")
    for i, t in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if t.role != want:
            raise SampleError(
                origin,
                f"turn {i} is {t.role!r}, expected {want!r}: roles must alternate user/assistant",
            )
    if body and body[-1].role == "user" and allow_prompt_only:
        return  # a prompt: the caller's teacher writes the reply
    if not any(t.role == "assistant" for t in body):
        ends_on_user = bool(body) and body[-1].role == "user"
        hint = (
            f" (the conversation ends on the user's turn: {DISTILL_HINT})" if ends_on_user else ""
        )
        raise SampleError(origin, "no assistant reply to train on" + hint)
