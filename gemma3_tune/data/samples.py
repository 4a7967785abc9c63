"""Record -> turns -> sample: the one path a chat record takes to training tokens (raw text
and prompt-completion rows take documents.py's; `documents.record_documents` chooses).

`record_turns` checks a record into turns (`sources.to_turns`, with its source's options) and
refuses images for a text-only model; `record_sample` renders those turns with the loss mask,
after a teacher's reply is appended where the conversation ends on the user's turn. Preparing
data renders every sample through `record_sample`; teacher prompts (answers.py) are found
through `record_turns`, and preference pairs (preference.py) refuse images as `check_vision`
does.
"""

from __future__ import annotations

from collections.abc import Callable

from .records import Record, SampleError
from .sources import to_turns
from .template import Sample, TrainOn, Turn, VisionTokens, has_images, render
from .tokenizer import Tokenizer

TEXT_ONLY = "has an image, but the model is text-only (use a 4B+ Gemma 3)"

# A conversation and its origin -> the conversation with the assistant's reply appended where
# it ends on the user's turn (a teacher's: answers.answered).
Reply = Callable[[list[Turn], str], list[Turn]]


def check_vision(turns: list[Turn], vision: VisionTokens | None, origin: str) -> None:
    """Refuse images when the model is text-only (`vision` None)."""
    if vision is None and has_images(turns):
        raise SampleError(origin, TEXT_ONLY)


def record_turns(
    rec: Record, vision: VisionTokens | None, options: dict, allow_prompt_only: bool = False
) -> list[Turn]:
    """One record validated into turns. `options`: to_turns' keyword arguments for its source
    (settings.turn_options: image root, Pan & Scan, ...); `allow_prompt_only`: also accept a
    conversation ending on the user's turn."""
    turns = to_turns(rec, allow_prompt_only=allow_prompt_only, **options)
    check_vision(turns, vision, rec.origin)
    return turns


def record_sample(
    rec: Record,
    tok: Tokenizer,
    vision: VisionTokens | None,
    options: dict,
    train_on: TrainOn = "assistant",
    reply: Reply | None = None,
) -> Sample:
    """One record -> its training sample (ids, labels, images, origin). With `reply`, a
    conversation ending on the user's turn is accepted and gets the reply before rendering."""
    turns = record_turns(rec, vision, options, allow_prompt_only=reply is not None)
    if reply is not None:
        turns = reply(turns, rec.origin)
    sample = render(turns, tok, vision, train_on)
    sample.origin = rec.origin
    return sample
