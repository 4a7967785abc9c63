"""Rows that are documents, not chats: raw text for continued pretraining and TRL's
prompt-completion rows. Each becomes token documents directly (`record_documents` picks this
path by the row's keys):

- **raw text**, `{"text": STR}` (or a .txt file): `<bos>` + text + `<eos>`, no chat template,
  the loss on every token. A document longer than `data.max_seq_len` is not truncated: it is
  cut into consecutive windows, each its own document for the masks and each opening with
  `<bos>` (Gemma 3 always saw one at position 0), so a window holds `max_seq_len - 1` of the
  document's tokens. With `data.text_overlap: N` a window after the first repeats the last N
  tokens of the one before as context, with no loss on them: every token of the document is a
  target exactly once, either way (without overlap, a window's first token is predicted from
  `<bos>` alone).
- **prompt-completion**, `{"prompt": STR, "completion": STR}`: plain text, the loss on the
  completion only (TRL's `completion_only_loss` default); `<bos>` + prompt + completion +
  `<eos>`, tokenized as one text, the completion starting where the tokenized prompt and the
  tokenized whole diverge, exactly as TRL's SFTTrainer does. With message lists it is a
  conversation rendered by the chat template, the loss on everything after the prompt's
  `<start_of_turn>model\\n` (TRL's completion mask).

A row's `train_on` does not apply to either: raw text trains on every token, prompt-completion
on the completion.
"""

from __future__ import annotations

from .records import Record, SampleError
from .samples import Reply, record_sample, record_turns
from .template import IGNORE, Sample, VisionTokens, generation_prompt, render
from .tokenizer import Tokenizer

CHAT_KEYS = ("messages", "conversations", "instruction", "chosen", "rejected")
EOS_TEXT = "<eos>"


def document_kind(data: object) -> str | None:
    """ "text" for a raw text row, "completion" for a prompt-completion row, else None."""
    if not isinstance(data, dict):
        return None
    if "text" in data:
        return "text"
    if "prompt" in data and "completion" in data:
        return "completion"
    return None


def _text(rec: Record) -> str:
    data = rec.data
    both = [k for k in CHAT_KEYS if k in data] + ["completion"] * ("completion" in data)
    if both:
        raise SampleError(
            rec.origin,
            f"both 'text' and '{both[0]}': a row is raw text or a chat, not both; remove one",
        )
    text = data["text"]
    if not isinstance(text, str):
        raise SampleError(rec.origin, f"'text' must be a string, not {type(text).__name__}")
    if not text.strip():
        raise SampleError(rec.origin, "'text' is empty; remove the row")
    return text


def text_windows(rec: Record, tok: Tokenizer, max_len: int, overlap: int) -> list[Sample]:
    """A raw text row's windows (see the module docstring), numbered from 1 in `window`."""
    ids = tok.encode(_text(rec)) + [tok.eos_id]  # the document after <bos>
    room = max_len - 1  # each window opens with <bos>
    step = room - overlap
    out: list[Sample] = []
    start = 0
    while True:
        piece = ids[start : start + room]
        context = overlap if start else 0  # targets of the window before
        labels = [IGNORE] * (1 + context) + piece[context:]
        out.append(Sample([tok.bos_id, *piece], labels, origin=rec.origin, window=len(out) + 1))
        if start + room >= len(ids):
            return out
        start += step


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _completion_sample(rec: Record, prompt_ids: list[int], ids: list[int], images) -> Sample:
    """The whole row's ids, labelled from where they leave the prompt's (TRL's rule)."""
    start = _common_prefix(prompt_ids, ids)
    if start == len(ids):
        raise SampleError(rec.origin, "'completion' adds no tokens to the prompt; remove the row")
    labels = [IGNORE] * start + ids[start:]
    return Sample(ids, labels, images, origin=rec.origin)


def prompt_completion(
    rec: Record, tok: Tokenizer, vision: VisionTokens | None, options: dict
) -> Sample:
    """A prompt-completion row (see the module docstring) -> its sample."""
    data = rec.data
    prompt, completion = data["prompt"], data["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise SampleError(rec.origin, "'completion' is empty; remove the row")
        completion = completion.removesuffix(EOS_TEXT)  # TRL appends <eos> unless it is there
        prompt_ids = [tok.bos_id, *tok.encode(prompt)]
        ids = [tok.bos_id, *tok.encode(prompt + completion), tok.eos_id]
        return _completion_sample(rec, prompt_ids, ids, [])
    if not (isinstance(prompt, list) and isinstance(completion, list) and completion):
        raise SampleError(
            rec.origin,
            "'prompt' and 'completion' must both be strings (plain text) or both message lists"
            " (a conversation)",
        )
    extra = {k: data[k] for k in ("images", "tools") if k in data}
    head = record_turns(Record(rec.origin, {"messages": prompt, **extra}), vision, options, True)
    whole = record_turns(Record(rec.origin, {"messages": prompt + completion, **extra}), vision,
                         options)  # fmt: skip
    prompt_ids, _ = generation_prompt(head, tok, vision)
    full = render(whole, tok, vision, "all")
    return _completion_sample(rec, prompt_ids, full.input_ids, full.images)


def record_documents(
    rec: Record,
    tok: Tokenizer,
    vision: VisionTokens | None,
    options: dict,
    cfg,
    reply: Reply | None = None,
) -> list[Sample]:
    """One record -> its samples: a raw text row's windows, a prompt-completion row's sample,
    or a chat's (samples.record_sample). `cfg`: the DataConfig."""
    if isinstance(rec.data, SampleError):
        raise rec.data
    kind = document_kind(rec.data)
    if kind == "text":
        return text_windows(rec, tok, cfg.max_seq_len, cfg.text_overlap)
    if kind == "completion":
        return [prompt_completion(rec, tok, vision, options)]
    return [record_sample(rec, tok, vision, options, cfg.train_on, reply)]
