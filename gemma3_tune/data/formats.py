"""Each chat format a record may take, as turns: OpenAI/TRL `messages` (with tool calling),
ShareGPT `conversations` (with LLaMA-Factory's tool turns), Alpaca, and TRL's prompt-only rows.
`sources.to_turns` picks the format by the record's keys and checks the turns' order; the
formats are described in sources.py's docstring."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import tools as fc
from .image_refs import image_ref, resolve_image
from .records import SampleError
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


@dataclass
class Ctx:
    """What turning one record into turns needs besides the record."""

    origin: str
    image_root: Path | None
    base: Path
    pan_and_scan: bool
    pas_args: dict
    store: Path | None

    def image(self, src: object) -> ImageRef:
        path = resolve_image(src, self.origin, self.image_root, self.base, self.store)
        return image_ref(path, self.origin, self.pan_and_scan, self.pas_args)

    def error(self, reason: str) -> SampleError:
        return SampleError(self.origin, reason)


FORMATS = "'messages' (OpenAI/TRL), 'conversations' (ShareGPT) or 'instruction' + 'output' (Alpaca)"


def _role(raw: object, origin: str, i: int) -> str:
    role = ROLE_ALIASES.get(raw) if isinstance(raw, str) else None
    if role is None:
        raise SampleError(
            origin, f"message {i}: unknown role {raw!r}; use system, user, assistant or tool"
        )
    return role


def declared_tools(raw: object, ctx: Ctx) -> Tools | None:
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


def _calls(raw: object, ctx: Ctx, i: int) -> list[ToolCall]:
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


def _content_parts(content, ctx: Ctx, i: int, role: str, images: list) -> list:
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


def from_messages(msgs, images, ctx: Ctx) -> list[Turn]:
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


def from_alpaca(data: dict, ctx: Ctx) -> list[Turn]:
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
DISTILL_HINT = (
    "a distill: section with a teacher can answer it (distill.teacher), or objective: grpo"
    " trains on prompts with reward functions (rl.rewards)"
)


def from_prompt(data: dict, ctx: Ctx, allowed: bool) -> list[Turn]:
    """TRL's prompt-only row: messages ending on the user's turn, or one user text."""
    if not allowed:
        raise ctx.error(f"a 'prompt'-only row has no assistant reply to train on; {DISTILL_HINT}")
    prompt = data["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ctx.error("'prompt' is empty")
        prompt = [{"role": "user", "content": prompt}]
    turns = from_messages(prompt, data.get("images"), ctx)
    if turns[-1].role != "user":
        raise ctx.error(
            "'prompt' must end on a user message (TRL prompt-only); put whole conversations"
            " under 'messages'"
        )
    return turns


def from_sharegpt(data, ctx: Ctx) -> list[Turn]:
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


def _sharegpt_tool_turn(turns: list[Turn], kind: str, value, ctx: Ctx, i: int) -> list[Turn]:
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
