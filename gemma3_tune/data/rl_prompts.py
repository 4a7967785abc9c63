"""Prompts for reinforcement learning (objective: grpo): TRL's prompt-only rows
(`{"prompt": STR | messages}`, or messages ending on the user's turn, with `images` and
`tools` as chat rows have them), each rendered as generation starts from it, and every other
column of the row kept for the reward functions (TRL passes them as keyword arguments).

A prompt that leaves no room for `max_completion_length` tokens inside `data.max_seq_len` is
dropped and counted (a completion is never cut for lack of room); bad rows are refused like
any sample (`data check` lists them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .dataset import DataErrors, Report, split_eval
from .records import Record, SampleError
from .samples import record_turns
from .settings import DataConfig, resolve_path, turn_options
from .template import IGNORE, ImageRef, Sample, Turn, VisionTokens, generation_prompt
from .tokenizer import Tokenizer

PROMPT_KEYS = ("prompt", "messages")  # what the prompt is read from: not a reward column


@dataclass
class RLPrompt:
    ids: list[int]  # the conversation as training renders it, then <start_of_turn>model\n
    images: list[ImageRef]
    origin: str  # "file:line"
    prompt: object  # as the row gives it (a string or messages): reward functions get it
    columns: dict = field(default_factory=dict)  # the row's other columns

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)

    def sample(self) -> Sample:
        """As a sample of one prompt (nothing labelled), so it rides the usual row machinery."""
        return Sample(self.ids, [IGNORE] * len(self.ids), list(self.images), self.origin)


@dataclass
class RLData:
    """What `train` needs of the data: rows (one prompt each), the prompts, a report."""

    train: list[RLPrompt]
    eval: list[RLPrompt]
    report: Report

    @property
    def train_rows(self) -> list[list[Sample]]:
        return [[p.sample()] for p in self.train]

    @property
    def eval_rows(self) -> list[list[Sample]]:
        return [[p.sample()] for p in self.eval]

    def image_refs(self) -> list[ImageRef]:
        return [im for p in self.train + self.eval for im in p.images]


ENDS_ON_REPLY = (
    'objective: grpo reads prompts only (TRL\'s {"prompt": ...}); this row ends on a reply:'
    " remove it, or train on such rows with objective: sft"
)


def check_prompt_only(turns: list[Turn], origin: str, why: str = ENDS_ON_REPLY) -> None:
    """Refuse a conversation that ends on a reply (`why` says what to do instead)."""
    if turns[-1].role != "user":
        raise SampleError(origin, why)


def prompt_and_columns(rec: Record) -> tuple[object, dict]:
    """The prompt as the row gives it (a string or messages: reward functions get it as is)
    and the row's other columns."""
    data = rec.data if isinstance(rec.data, dict) else {}
    columns = {k: v for k, v in data.items() if k not in PROMPT_KEYS}
    return data.get("prompt", data.get("messages")), columns


def rl_prompt(rec: Record, tok: Tokenizer, vision: VisionTokens | None, options: dict) -> RLPrompt:
    """One prompt-only record rendered as generation starts from it. `options`: to_turns'
    keyword arguments for its source (settings.turn_options)."""
    turns = record_turns(rec, vision, options, allow_prompt_only=True)
    check_prompt_only(turns, rec.origin)
    ids, images = generation_prompt(turns, tok, vision)
    return RLPrompt(ids, images, rec.origin, *prompt_and_columns(rec))


def _read(cfg: DataConfig, sources, tok, vision, base: Path, room: int, report: Report):
    from .sources import read_records

    prompts: list[RLPrompt] = []
    errors: list[SampleError] = []
    for src in sources:
        path = resolve_path(src.path, base)
        options = turn_options(cfg, base, path)
        for rec in read_records(path):
            try:
                p = rl_prompt(rec, tok, vision, options)
            except SampleError as e:
                errors.append(e)
                if len(errors) >= cfg.max_errors:
                    raise DataErrors(errors, True) from None
                continue
            if len(p.ids) > room:
                report.note(True, p.origin, len(p.ids))
                continue
            prompts.append(p)
    if errors:
        raise DataErrors(errors, False)
    return prompts


def read_prompts(
    cfg: DataConfig,
    tok: Tokenizer,
    vision: VisionTokens | None,
    base: Path,
    seed: int,
    max_completion_length: int,
) -> RLData:
    """The train and held-out prompts of `cfg` (data.eval, or data.eval_split of train)."""
    room = cfg.max_seq_len - max_completion_length  # > 0: refused before (grpo.py)
    report = Report()
    train = _read(cfg, cfg.train, tok, vision, base, room, report)
    if cfg.eval:
        held = _read(cfg, cfg.eval, tok, vision, base, room, Report())
    else:
        train, held = split_eval(train, cfg.eval_split, seed)
    report.samples = len(train)
    report.eval_samples = len(held)
    report.rows = len(train)
    report.tokens = sum(len(p.ids) for p in train)
    report.images = sum(len(p.images) for p in train)
    report.lengths = [len(p.ids) for p in train]
    return RLData(train, held, report)
