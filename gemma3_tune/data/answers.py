"""Teacher answers for prompt-only data: distillation from prompts alone.

A sample whose conversation ends on the user's turn (messages ending with a user message,
ShareGPT ending with a human turn, TRL's `{"prompt": ...}`) has no reply to learn from. With a
`distill:` teacher, the teacher writes one first:
- `find_prompts` lists every such prompt of the train and eval sources, rendered exactly as
  training renders the conversation, then `<start_of_turn>model\\n`;
- `answer_prompts` decodes the replies in batches through our KV-cache decoder (greedy, or
  sampled at `distill.generate.temperature`) and appends them to an `AnswerStore`;
- `prepare(..., answers=store)` appends each reply as the assistant turn before rendering
  (`answered`), so the reply and its `<end_of_turn>` carry the loss exactly as if the user had
  written the reply in the file.

A conversation with earlier replies that ends on a user turn (user, assistant, user) is a prompt
too: the teacher answers its last turn. Replies are keyed by the prompt's token ids and images
(`prompt_key`), so one store serves every data set holding the same prompt. A sampled reply
draws from a generator seeded by the seed and its prompt's key: it depends on neither the
prompts batched with it nor where an interrupted fill stopped.

The store is one JSONL file, a line per reply, written a batch at a time and flushed: a killed
fill keeps every batch it finished, and a torn last line is ignored on load (and cut before the
next append).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .dataset import DataErrors
from .documents import document_kind
from .records import SampleError
from .samples import record_turns
from .settings import DataConfig, pan_and_scan_args, resolve_path, turn_options
from .sources import read_records
from .template import ImageRef, Turn, VisionTokens, generation_prompt
from .tokenizer import Tokenizer

FILE = "answers.jsonl"


def prompt_key(prompt_ids: list[int], images: list[ImageRef]) -> str:
    """sha256 (hex) of the prompt's token ids and its images (resolved path, views)."""
    blob = json.dumps(
        {"ids": list(prompt_ids), "images": [[im.path, im.views] for im in images]},
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def prompt_seed(seed: int, key: str) -> int:
    """The seed of one prompt's sampling generator (63 bits): from the run's seed and the key."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:16], 16) >> 1


class AnswerStore:
    """Append-only JSONL of teacher replies keyed by prompt hash, in `folder` (one folder per
    teacher and generation settings: the caller names it). Each line is
    `{"key", "reply", "ids", "stopped", "origin"}`: the reply's text (what training reads), its
    generated token ids, whether it ended on a stop token (False: it hit max_new_tokens), and
    the sample it first answered."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @property
    def path(self) -> Path:
        return self.folder / FILE

    def entries(self) -> dict[str, dict]:
        """prompt key -> its line. A torn last line (a write cut short) is skipped; a broken
        line anywhere else is an error (the file was edited)."""
        if not self.path.is_file():
            return {}
        lines = self.path.read_bytes().split(b"\n")
        out: dict[str, dict] = {}
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
                key, reply = entry["key"], entry["reply"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                if i == len(lines) - 1:  # no newline after it: the write was cut short
                    continue
                raise UserError(
                    f"{self.path}:{i + 1}: not a teacher answer line; delete the file to"
                    " have the teacher answer again"
                ) from None
            if isinstance(key, str) and isinstance(reply, str):
                out.setdefault(key, entry)
        return out

    def load(self) -> dict[str, str]:
        """prompt key -> reply text."""
        return {k: e["reply"] for k, e in self.entries().items()}

    def digest(self, keys: Iterable[str] | None = None) -> str:
        """A hash of the replies (of `keys` only, when given), independent of line order: what
        prepared rows depend on. Scoped to a data set's prompts, it ignores replies the store
        holds for other data (one store serves every data set of a teacher)."""
        replies = self.load()
        wanted = sorted(replies if keys is None else set(keys))
        blob = json.dumps([[k, replies.get(k)] for k in wanted], separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def append(self, entries: list[dict]) -> None:
        """Write lines and flush (after mending the last line, so no line is glued to it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._mend_tail()
        with open(self.path, "a", encoding="utf-8") as f:
            for e in entries:
                f.write(json.dumps(e, ensure_ascii=False) + "\n")
            f.flush()

    def _mend_tail(self) -> None:
        """A last line without its newline: cut it when torn, end it when whole."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(-1, 2)
            if f.read(1) == b"\n":  # the usual case: read one byte, not the file
                return
            f.seek(0)
            data = f.read()
            start = data.rfind(b"\n") + 1
            try:
                json.loads(data[start:])
                f.write(b"\n")
            except (json.JSONDecodeError, UnicodeDecodeError):
                f.truncate(start)


@dataclass
class Prompt:
    """One prompt for the teacher: the ids generation starts from, and its images."""

    key: str  # prompt_key(ids, images)
    ids: list[int]  # the conversation as training renders it, then <start_of_turn>model\n
    images: list[ImageRef]
    origin: str  # "file:line" of its first sample
    crops: dict | None = None  # the Pan & Scan settings its views were counted with; None: off


def prompt_of(
    turns: list[Turn],
    tok: Tokenizer,
    vision: VisionTokens | None,
    origin: str,
    crops: dict | None = None,
) -> Prompt | None:
    """The Prompt of a conversation that ends on the user's turn, else None."""
    if turns[-1].role != "user":
        return None
    ids, images = generation_prompt(turns, tok, vision)
    return Prompt(prompt_key(ids, images), ids, images, origin, crops)


def answered(
    turns: list[Turn],
    tok: Tokenizer,
    vision: VisionTokens | None,
    answers: dict[str, str],
    origin: str,
) -> list[Turn]:
    """The turns with the teacher's reply appended when they end on the user's turn."""
    prompt = prompt_of(turns, tok, vision, origin)
    if prompt is None:
        return turns
    reply = answers.get(prompt.key)
    if reply is None:
        raise SampleError(origin, "no reply from the teacher for this prompt")
    return [*turns, Turn("assistant", [reply])]


def find_prompts(
    cfg: DataConfig, tok: Tokenizer, vision: VisionTokens | None, base: Path
) -> list[Prompt]:
    """Every sample of cfg.train and cfg.eval whose conversation ends on a user turn, as a
    Prompt, deduplicated by key (first origin kept). Every sample is validated on the way: bad
    ones raise DataErrors (up to data.max_errors), as preparing does."""

    errors: list[SampleError] = []
    more = False
    found: dict[str, Prompt] = {}
    for src in [*cfg.train, *(cfg.eval or [])]:
        path = resolve_path(src.path, base)
        options = turn_options(cfg, base, path)
        crops = pan_and_scan_args(cfg) if cfg.pan_and_scan else None
        try:
            for rec in read_records(path):
                if document_kind(rec.data) is not None:  # raw text, prompt-completion: no
                    continue  # reply to ask for; they train as documents
                try:
                    turns = record_turns(rec, vision, options, allow_prompt_only=True)
                    prompt = prompt_of(turns, tok, vision, rec.origin, crops)
                except SampleError as e:
                    if len(errors) < cfg.max_errors:
                        errors.append(e)
                    else:
                        more = True
                    continue
                if prompt is not None:
                    found.setdefault(prompt.key, prompt)
        except SampleError as e:  # the whole source is unreadable
            errors.append(e)
    if errors:
        raise DataErrors(errors, more)
    return list(found.values())


# ---------------------------------------------------------------------------------------------
# Generating


def answer_prompts(
    model,
    tok: Tokenizer,
    prompts: list[Prompt],
    store: AnswerStore,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> int:
    """Generate a reply for every prompt not yet in the store and append it; returns how many
    were generated now. Text-only prompts go in batches (longest first, so the memory peak
    shows at once), prompts with images one at a time; each reply stops at a stop token
    (`tok.stop_ids()`) or after max_new_tokens (kept, and counted in the closing line)."""
    from ..progress import bar as progress_bar

    have = store.load()
    todo = list({p.key: p for p in prompts if p.key not in have}.values())
    if not todo:
        return 0
    todo.sort(key=lambda p: -len(p.ids))
    text = [p for p in todo if not p.images]
    groups = [text[a : a + batch_size] for a in range(0, len(text), batch_size)]
    groups += [[p] for p in todo if p.images]
    tokens = cut = 0
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()  # no dropout in the teacher (an adapter's LoRA dropout included)
    try:
        with progress_bar(len(todo), "teacher answers", "prompt", enabled=progress) as bar:
            for group in groups:
                replies = _generate(model, tok, group, max_new_tokens, temperature, seed)
                store.append(
                    [
                        {
                            "key": p.key,
                            "reply": tok.decode(ids),
                            "ids": ids,
                            "stopped": len(ids) < max_new_tokens,
                            "origin": p.origin,
                        }
                        for p, ids in zip(group, replies, strict=True)
                    ]
                )
                tokens += sum(len(ids) for ids in replies)
                cut += sum(len(ids) >= max_new_tokens for ids in replies)
                bar.update(len(group))
                bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):,.0f} tokens/s")
    finally:
        model.train(was_training)
    hit = f"{cut} hit" if cut else "none hit"
    advice = ": raise it if replies are cut" if cut else ""
    print(
        f"teacher answered {len(todo)} prompts ({hit} distill.generate.max_new_tokens="
        f"{max_new_tokens}{advice})",
        file=sys.stderr,
    )
    return len(todo)


def _generate(
    model, tok: Tokenizer, group: list[Prompt], max_new_tokens: int, temperature: float, seed: int
) -> list[list[int]]:
    """Reply ids for one batch of text prompts, or for one prompt with images."""
    import torch

    from ..model.generate import generate, generate_batch

    device = next(model.parameters()).device
    seeds = [prompt_seed(seed, p.key) for p in group]
    if group[0].images:  # one prompt, with its pixels
        (p,) = group
        return [
            list(
                generate(
                    model,
                    torch.tensor([p.ids], device=device),
                    max_new_tokens=max_new_tokens,
                    pixel_values=_pixels(model, p),
                    temperature=temperature,
                    stop_ids=tok.stop_ids(),
                    seed=seeds[0] if temperature > 0 else None,
                )
            )
        ]
    generators = None
    if temperature > 0:
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    return generate_batch(
        model,
        [p.ids for p in group],
        max_new_tokens=max_new_tokens,
        stop_ids=tok.stop_ids(),
        pad_id=tok.pad_id,
        temperature=temperature,
        generator=generators,
    )


def _pixels(model, prompt: Prompt):
    """The prompt's pixel values `[views, 3, H, W]` (its crops cut as data preparation counted
    them), in the model's dtype, on its device."""
    import torch

    from .images import preprocess

    w = next(model.parameters())
    size = model.config.vision.image_size
    crops = prompt.crops or {}
    px = torch.cat(
        [preprocess(im.path, size, prompt.crops is not None, **crops) for im in prompt.images]
    )
    return px.to(w.device, w.dtype)


__all__ = [
    "AnswerStore",
    "Prompt",
    "answer_prompts",
    "answered",
    "find_prompts",
    "prompt_key",
    "prompt_seed",
]
