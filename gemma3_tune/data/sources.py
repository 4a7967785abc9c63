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
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import tools as fc
from .template import ImageRef, ToolCall, ToolResult, Tools, Turn

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "developer": "system",
    "tool": "tool",
    "ipython": "tool",  # Llama 3's name for tool results
}


class SampleError(ValueError):
    """One bad sample: `origin` is "file:line" (or "file:row N"); the message says why."""

    def __init__(self, origin: str, reason: str):
        super().__init__(f"{origin}: {reason}")
        self.origin, self.reason = origin, reason


@dataclass
class Record:
    origin: str  # "path:line" or "path:row N"
    data: object  # the decoded JSON object (or table row as a dict)


def read_records(path: str | os.PathLike) -> Iterator[Record]:
    """Yield every record of a source; broken lines become SampleErrors (raised lazily)."""
    path = Path(path)
    if not path.exists():
        raise SampleError(str(path), "no such file or folder; check data.train / data.eval")
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
            " .parquet, .arrow or a datasets.save_to_disk folder",
        )
    yield from _read_jsonl(path)


def _read_jsonl(
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
            yield from _read_jsonl(path)
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
# Normalising one record into turns


def _stored_image(data: bytes, origin: str, store: Path | None) -> Path:
    """Image bytes (a datasets.Image() value) as a file, named by their hash, written once."""
    import hashlib
    import io

    from PIL import Image

    if store is None:
        from .settings import default_cache_dir

        store = default_cache_dir() / "images"
    try:
        with Image.open(io.BytesIO(data)) as im:
            ext = (im.format or "png").lower()
    except Exception as e:  # PIL raises several types for corrupt data
        raise SampleError(origin, f"cannot read image bytes ({e})") from None
    path = store / f"{hashlib.sha256(data).hexdigest()[:32]}.{ext}"
    if not path.is_file():
        store.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)  # atomic: parallel workers may write the same image
    return path


def _resolve(
    image: object, origin: str, image_root: Path | None, base: Path, store: Path | None = None
) -> Path:
    if isinstance(image, dict) and ("bytes" in image or "path" in image):  # datasets.Image()
        if image.get("bytes"):
            return _stored_image(image["bytes"], origin, store)
        image = image.get("path")
    if not isinstance(image, str) or not image:
        raise SampleError(
            origin,
            "an image must be a file path or {'bytes': ..., 'path': ...} (datasets.Image());"
            f" got {type(image).__name__}",
        )
    if image.startswith(("http://", "https://")):
        raise SampleError(
            origin, f"image URLs are not fetched ({image}); download it and give a path"
        )
    p = Path(image)
    if p.is_absolute():
        return p
    if image_root is None:
        return base / p
    resolved = (image_root / p).resolve()
    if not resolved.is_relative_to(image_root.resolve()):
        raise SampleError(
            origin,
            f"image path {image} leaves data.image_root ({image_root}); give a path inside it"
            " or an absolute path",
        )
    return resolved


def _image_ref(path: Path, origin: str, pan_and_scan: bool, pas_args: dict) -> ImageRef:
    """Check the image opens (header only) and count its views as preprocessing will cut
    them: the Pan & Scan crops of the upright image (EXIF orientation applied)."""
    from .images import ImageError, image_views  # torch: only for images

    if not path.is_file():
        raise SampleError(
            origin,
            f"image not found: {path} (relative paths resolve from data.image_root, else the data file's folder)",
        )
    try:
        views = image_views(path, pan_and_scan, **pas_args)
    except ImageError as e:  # too large, corrupt: one line naming the file
        raise SampleError(origin, str(e)) from None
    return ImageRef(str(path), views)


@dataclass
class _Ctx:
    """What turning one record into turns needs besides the record."""

    origin: str
    image_root: Path | None
    base: Path
    pan_and_scan: bool
    pas_args: dict
    store: Path | None

    def image(self, src: object) -> ImageRef:
        path = _resolve(src, self.origin, self.image_root, self.base, self.store)
        return _image_ref(path, self.origin, self.pan_and_scan, self.pas_args)

    def error(self, reason: str) -> SampleError:
        return SampleError(self.origin, reason)


FORMATS = "'messages' (OpenAI/TRL), 'conversations' (ShareGPT) or 'instruction' + 'output' (Alpaca)"


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
    ctx = _Ctx(origin, image_root, base or Path("."), pan_and_scan, pas_args or {}, image_store)
    if data.get("messages") is not None:
        turns = _from_messages(data["messages"], data.get("images"), ctx)
    elif data.get("conversations") is not None:
        turns = _from_sharegpt(data, ctx)
    elif "instruction" in data and "output" in data:
        turns = _from_alpaca(data, ctx)
    elif data.get("prompt") is not None and not PAIRED_KEYS & data.keys():
        turns = _from_prompt(data, ctx, allow_prompt_only)
    elif "chosen" in data or "rejected" in data:
        raise SampleError(
            origin,
            "a preference pair (TRL's prompt/chosen/rejected), not a chat; set objective: dpo"
            " (or orpo) to train on pairs",
        )
    else:
        keys = ", ".join(sorted(map(str, data))) or "none"
        raise SampleError(
            origin, f"no 'messages' or 'conversations' key (keys: {keys}); use {FORMATS}"
        )
    tools = _tools(data.get("tools"), ctx)
    _check_order(turns, origin, allow_prompt_only)
    if tools is not None:
        _check_calls(turns, tools, ctx)
        if turns[0].role != "system":
            turns.insert(0, Turn("system", []))
        turns[0].parts.append(tools)
    return turns


def _role(raw: object, origin: str, i: int) -> str:
    role = ROLE_ALIASES.get(raw) if isinstance(raw, str) else None
    if role is None:
        raise SampleError(
            origin, f"message {i}: unknown role {raw!r}; use system, user, assistant or tool"
        )
    return role


def _tools(raw: object, ctx: _Ctx) -> Tools | None:
    """Top-level `tools`: a list of OpenAI-style function schemas (or a JSON string of one)."""
    if raw is None or raw == "" or raw == []:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ctx.error(f"'tools' is a string but not JSON ({e.msg})") from None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise ctx.error("'tools' must be a list of function schemas")
    try:
        return Tools([fc.function_schema(t) for t in raw])
    except fc.ToolFormatError as e:
        raise ctx.error(f"tools: {e}") from None


def _calls(raw: object, ctx: _Ctx, i: int) -> list[ToolCall]:
    """An assistant message's `tool_calls`: OpenAI's `{"function": {"name", "arguments"}}`
    (arguments a JSON string or an object), or bare `{"name", "arguments"}`."""
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise ctx.error(f"message {i}: 'tool_calls' must be a list")
    calls = []
    for j, c in enumerate(raw):
        fn = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ctx.error(
                f"message {i} tool call {j}: expected {{'function': {{'name': ..., 'arguments': {{...}}}}}}"
            )
        try:
            args = fc.parse_arguments(fn.get("arguments", fn.get("parameters")))
        except fc.ToolFormatError as e:
            raise ctx.error(f"message {i} tool call {j} ({fn['name']}): {e}") from None
        calls.append(ToolCall(fn["name"], args))
    return calls


def _content_parts(content, ctx: _Ctx, i: int, role: str, images: list) -> list:
    """A message's content as text and ImageRef parts; TRL placeholders take `images`."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise ctx.error(f"message {i} ({role}): content must be a string or a list of parts")
    parts: list = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind in ("image", "image_url"):
            src = part.get("image") or part.get("path") or part.get("image_url")
            if isinstance(src, dict) and "url" in src:  # OpenAI's {"image_url": {"url": ...}}
                src = src["url"]
            if src is None:  # TRL: {"type": "image"} takes the next of the sample's images
                if not images:
                    raise ctx.error(
                        f"message {i} part {j}: an {{'type': 'image'}} placeholder, but the"
                        " sample's 'images' list has no image left for it"
                    )
                src = images.pop(0)
            parts.append(ctx.image(src))
        else:
            raise ctx.error(
                f"message {i} part {j}: expected {{'type': 'text', 'text': ...}} or {{'type': 'image', 'image': PATH}}",
            )
    return parts


def _from_messages(msgs, images, ctx: _Ctx) -> list[Turn]:
    if not isinstance(msgs, list) or not msgs:
        raise ctx.error("'messages' must be a non-empty list")
    images = [images] if isinstance(images, str | dict) else list(images or [])
    n_images = len(images)
    turns: list[Turn] = []
    pending: dict[str, str] = {}  # tool_call_id -> function name, for the results that follow
    last_calls: list[ToolCall] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ctx.error(f"message {i}: must be an object with 'role' and 'content'")
        role = _role(m.get("role"), ctx.origin, i)
        content = m.get("content")
        calls = (
            _calls(m["tool_calls"], ctx, i) if role == "assistant" and m.get("tool_calls") else []
        )
        empty = content is None or content == "" or content == []
        if role == "tool":
            if not turns or turns[-1].role != "assistant" or not last_calls:
                raise ctx.error(
                    f"message {i} (tool): a tool result must follow the assistant's tool_calls"
                )
            name = m.get("name") or pending.get(m.get("tool_call_id"))
            if name is None and len(last_calls) == 1:
                name = last_calls[0].name
            if not name:
                raise ctx.error(
                    f"message {i} (tool): say which call it answers ('name' or 'tool_call_id')"
                )
            if isinstance(content, list):  # [{"type": "text", "text": ...}]
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            turns[-1].parts.append(ToolResult(name, "" if content is None else content))
            continue
        if empty and not calls:
            raise ctx.error(f"message {i} ({role}): missing content")
        parts = [] if empty else _content_parts(content, ctx, i, role, images)
        if role != "user" and any(isinstance(p, ImageRef) for p in parts):
            raise ctx.error(f"message {i}: images are only supported in user messages")
        parts += calls
        continues = role == "assistant" and turns and isinstance(turns[-1].parts[-1], ToolResult)
        if turns and turns[-1].role == "assistant" and _awaits_result(turns[-1]):
            raise ctx.error(
                f"message {i} ({role}): the tool_calls before it need their results first"
                " (messages with role 'tool')"
            )
        if continues:  # the reply after the results: the same model turn
            turns[-1].parts += parts
        else:
            turns.append(Turn(role, parts))
        if calls:
            last_calls = calls
            raw = m["tool_calls"] if isinstance(m["tool_calls"], list) else [m["tool_calls"]]
            pending = {
                c["id"]: call.name
                for c, call in zip(raw, calls, strict=True)
                if isinstance(c, dict) and c.get("id")
            }
    if images:
        raise ctx.error(
            f"{n_images} image(s) in 'images' but only {n_images - len(images)}"
            " {'type': 'image'} placeholder(s); they must match"
        )
    return turns


def _awaits_result(turn: Turn) -> bool:
    return bool(turn.parts) and isinstance(turn.parts[-1], ToolCall)


def _from_alpaca(data: dict, ctx: _Ctx) -> list[Turn]:
    """Alpaca: instruction (+ input) -> output, with optional system and history pairs."""
    fields = {k: data.get(k) for k in ("instruction", "input", "output", "system")}
    for k, v in fields.items():
        if v is not None and not isinstance(v, str):
            raise ctx.error(f"alpaca '{k}' must be a string")
    if not (fields["instruction"] or "").strip():
        raise ctx.error("alpaca 'instruction' is empty")
    if not (fields["output"] or "").strip():
        raise ctx.error(
            "alpaca 'output' is empty: no reply to train on (for a distill: teacher to answer"
            ' it, give the row as {"prompt": INSTRUCTION})'
        )
    turns = [Turn("system", [fields["system"]])] if (fields["system"] or "").strip() else []
    history = data.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(h, list | tuple) and len(h) == 2 and all(isinstance(x, str) for x in h)
        for h in history
    ):
        raise ctx.error("alpaca 'history' must be a list of [instruction, output] pairs")
    for q, a in history:
        turns += [Turn("user", [q]), Turn("assistant", [a])]
    query = fields["instruction"]
    if (fields["input"] or "").strip():
        query = query.strip() + "\n" + fields["input"].strip()
    return turns + [Turn("user", [query]), Turn("assistant", [fields["output"]])]


PAIRED_KEYS = {"completion", "chosen", "rejected"}  # TRL's other "prompt" formats: not read here
DISTILL_HINT = "a distill: section with a teacher can answer it (distill.teacher)"


def _from_prompt(data: dict, ctx: _Ctx, allowed: bool) -> list[Turn]:
    """TRL's prompt-only row: messages ending on the user's turn, or one user text."""
    if not allowed:
        raise ctx.error(f"a 'prompt'-only row has no assistant reply to train on; {DISTILL_HINT}")
    prompt = data["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ctx.error("'prompt' is empty")
        prompt = [{"role": "user", "content": prompt}]
    turns = _from_messages(prompt, data.get("images"), ctx)
    if turns[-1].role != "user":
        raise ctx.error(
            "'prompt' must end on a user message (TRL prompt-only); put whole conversations"
            " under 'messages'"
        )
    return turns


def _from_sharegpt(data, ctx: _Ctx) -> list[Turn]:
    conv = data["conversations"]
    origin = ctx.origin
    if not isinstance(conv, list) or not conv:
        raise SampleError(origin, "'conversations' must be a non-empty list")
    images = data.get("images") or []
    if isinstance(images, str | dict):
        images = [images]
    n_placeholders = sum(
        str(m.get("value", "")).count("<image>") for m in conv if isinstance(m, dict)
    )
    if n_placeholders != len(images):
        raise SampleError(
            origin,
            f"{n_placeholders} <image> placeholder(s) but {len(images)} image(s) in 'images'; they must match",
        )
    refs = iter(ctx.image(p) for p in images)
    turns: list[Turn] = []
    for i, m in enumerate(conv):
        if not isinstance(m, dict):
            raise SampleError(
                origin, f"conversation turn {i}: must be an object with 'from' and 'value'"
            )
        value = m.get("value")
        if m.get("from") in ("function_call", "observation"):  # LLaMA-Factory's tool turns
            turns = _sharegpt_tool_turn(turns, m["from"], value, ctx, i)
            continue
        role = _role(m.get("from"), origin, i)
        if not isinstance(value, str) or not value.strip():
            raise SampleError(origin, f"conversation turn {i} ({role}): missing value")
        pieces = value.split("<image>")
        parts: list = []
        for k, piece in enumerate(pieces):
            if k:
                if role != "user":
                    raise SampleError(
                        origin, f"conversation turn {i}: images are only supported in human turns"
                    )
                parts.append(next(refs))
            if piece.strip():
                parts.append(piece)
        if role == "assistant" and turns and turns[-1].role == "assistant":
            turns[-1].parts += parts  # the reply after an observation: the same model turn
        else:
            turns.append(Turn(role, parts))
    return turns


def _sharegpt_tool_turn(turns: list[Turn], kind: str, value, ctx: _Ctx, i: int) -> list[Turn]:
    """`function_call`: a JSON {"name", "arguments"} (or a list of them) the assistant sends;
    `observation`: the result, answering the calls just before it."""
    if not isinstance(value, str) or not value.strip():
        raise ctx.error(f"conversation turn {i} ({kind}): missing value")
    if kind == "function_call":
        try:
            raw = json.loads(value)
        except json.JSONDecodeError as e:
            raise ctx.error(f"conversation turn {i} (function_call): not JSON ({e.msg})") from None
        calls = _calls(raw, ctx, i)
        if turns and turns[-1].role == "assistant" and not _awaits_result(turns[-1]):
            turns[-1].parts += calls  # "let me check" text, then the call
        else:
            turns.append(Turn("assistant", calls))
        return turns
    if (
        not turns
        or turns[-1].role != "assistant"
        or not any(isinstance(p, ToolCall) for p in turns[-1].parts)
    ):
        raise ctx.error(f"conversation turn {i} (observation): must follow a function_call")
    calls = [p for p in turns[-1].parts if isinstance(p, ToolCall)]
    turns[-1].parts.append(ToolResult(calls[-1].name, value))
    return turns


def _check_calls(turns: list[Turn], tools: Tools, ctx: _Ctx) -> None:
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
