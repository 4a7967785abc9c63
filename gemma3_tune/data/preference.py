"""Preference pairs (DPO, ORPO): TRL's preference format rendered as one sample of two documents.

A row is either
- explicit: `{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}`,
  where a string prompt is one user turn and a string reply one assistant turn; or
- implicit: `{"chosen": messages, "rejected": messages}`, two whole conversations whose shared
  leading turns are the prompt (TRL's `extract_prompt`).

Either may carry `images` (the prompt's `{"type": "image"}` parts, in order) and `tools`, as a
`messages` row does. The pair becomes ONE sample: prompt + chosen, then prompt + rejected, laid
end to end with `split` marking where the second document starts. Positions restart there (the
model's masks keep the documents apart), packing moves the pair as one unit, and a too-long
pair is dropped and counted, never cut. Labels cover the replies only: every prompt turn (an
earlier assistant turn included) is context, so a document's labelled log-probability is the
reply's, which is what DPO compares.
"""

from __future__ import annotations

import json

from .records import Record, SampleError
from .samples import check_vision
from .sources import to_turns
from .template import IGNORE, Sample, Turn, VisionTokens, render
from .tokenizer import Tokenizer

PAIR_KEYS = ("prompt", "chosen", "rejected")
FORMAT = '{"prompt": ..., "chosen": ..., "rejected": ...} (TRL\'s preference format)'


def is_pair(data: object) -> bool:
    return isinstance(data, dict) and ("chosen" in data or "rejected" in data)


def _messages(value: object, role: str, key: str, origin: str) -> list:
    """A string as one turn of `role`, or a list of messages as given."""
    if isinstance(value, str):
        if not value.strip():
            raise SampleError(origin, f"'{key}' is empty: a pair needs a reply on both sides")
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value:
        return value
    if isinstance(value, list):
        raise SampleError(origin, f"'{key}' is an empty list: a pair needs a reply on both sides")
    raise SampleError(
        origin, f"'{key}' must be a string or a list of messages (got {type(value).__name__})"
    )


def split_pair(data: dict, origin: str) -> tuple[list, list, list]:
    """(prompt, chosen reply, rejected reply) as message lists, validated."""
    missing = [k for k in ("chosen", "rejected") if data.get(k) is None]
    if missing:
        raise SampleError(
            origin,
            f"has {'chosen' if missing == ['rejected'] else 'rejected'} but no '{missing[0]}';"
            f" a preference row is {FORMAT}",
        )
    if data.get("prompt") is not None:
        prompt = _messages(data["prompt"], "user", "prompt", origin)
        chosen = _messages(data["chosen"], "assistant", "chosen", origin)
        rejected = _messages(data["rejected"], "assistant", "rejected", origin)
    else:  # implicit prompt: the turns both conversations share
        chosen = _messages(data["chosen"], "assistant", "chosen", origin)
        rejected = _messages(data["rejected"], "assistant", "rejected", origin)
        k = 0
        while k < min(len(chosen), len(rejected)) and _same(chosen[k], rejected[k]):
            k += 1
        if k == 0:
            raise SampleError(
                origin,
                "'chosen' and 'rejected' share no leading turn, so there is no prompt; add a"
                f" 'prompt' key ({FORMAT})",
            )
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    if _same(chosen, rejected):
        raise SampleError(
            origin, "'chosen' equals 'rejected': the pair teaches nothing; fix or drop it"
        )
    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply:
            raise SampleError(origin, f"'{key}' has no reply after the prompt")
        first = reply[0].get("role") if isinstance(reply[0], dict) else None
        if first not in ("assistant", "gpt", "model"):
            raise SampleError(
                origin,
                f"'{key}' must start with the assistant's reply (its first message has role"
                f" {first!r})",
            )
    return prompt, chosen, rejected


def _same(a: object, b: object) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def pair_turns(rec: Record, options: dict) -> tuple[list[Turn], list[Turn], list[Turn]]:
    """A preference row (`is_pair`) validated into turns: (the prompt, prompt + chosen,
    prompt + rejected). `options`: to_turns' keyword arguments (image root, Pan & Scan, ...)."""
    data, origin = rec.data, rec.origin
    prompt, chosen, rejected = split_pair(data, origin)
    extra = {k: v for k, v in data.items() if k not in PAIR_KEYS}
    context = to_turns(
        Record(origin, {**extra, "messages": prompt}), allow_prompt_only=True, **options
    )
    if context[-1].role != "user":
        raise SampleError(origin, "the prompt must end on a user turn (the replies answer it)")
    c, r = (
        to_turns(Record(origin, {**extra, "messages": prompt + reply}), **options)
        for reply in (chosen, rejected)
    )
    return context, c, r


def render_pair(
    rec: Record,
    tok: Tokenizer,
    vision: VisionTokens | None,
    options: dict,
) -> Sample:
    """One preference row -> one sample of two documents (see the module docstring).
    `options`: to_turns' keyword arguments (image root, Pan & Scan, ...)."""
    data, origin = rec.data, rec.origin
    if isinstance(data, SampleError):
        raise data
    if not is_pair(data):
        kind = next((k for k in ("messages", "conversations", "instruction", "text") if k in data),
                    None)  # fmt: skip
        what = f"a '{kind}' row" if kind else "a row with no 'chosen'/'rejected'"
        raise SampleError(
            origin,
            f"{what} is not a preference pair: objective dpo/orpo needs {FORMAT}; for chats use"
            " objective: sft",
        )
    context, *replies = pair_turns(rec, options)
    check_vision(context, vision, origin)
    prefix = len(render(context, tok, vision).input_ids)
    docs = []
    for turns in replies:
        doc = render(turns, tok, vision, "assistant")
        doc.labels[:prefix] = [IGNORE] * prefix  # the prompt is context, earlier replies too
        docs.append(doc)
    c, r = docs
    if c.input_ids[:prefix] != r.input_ids[:prefix]:
        raise SampleError(origin, "the two replies render different prompts (report this)")
    if not c.trainable or not r.trainable:
        raise SampleError(origin, "a reply has no tokens to score")
    return Sample(
        c.input_ids + r.input_ids,
        c.labels + r.labels,
        c.images + r.images,
        origin,
        split=len(c),
    )
