"""Gemma 3's chat template, rendered straight to token ids with a loss mask.

    <bos><start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n<start_of_turn>model\n{reply}<end_of_turn>\n

- the system message is folded into the first user turn (Gemma has no system role);
- message text is stripped of surrounding whitespace, as in Gemma's own template;
- an image becomes `\n\n<start_of_image>` + N x `<image_soft_token>` + `<end_of_image>\n\n`
  (N = mm_tokens_per_image); with Pan & Scan, the image with its crops becomes
  `Here is the original image {block} and here are some crops to help you see better {block} {block}`;
- the loss covers each assistant reply and its `<end_of_turn>` (train_on="assistant"), only the
  last reply ("last"), or every text token ("all"); never image tokens or `<bos>`.

Text is tokenized in runs between special tokens, and a run is split where the loss mask
changes (after `model\n`). Because replies are stripped, this gives exactly the tokens of
tokenizing the whole rendered string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .tokenizer import Tokenizer

IGNORE = -100
TrainOn = Literal["assistant", "last", "all"]


@dataclass
class Turn:
    role: Literal["system", "user", "assistant"]
    parts: list[str | ImageRef]  # text, or an image


@dataclass
class ImageRef:
    path: str  # resolved path
    views: int = 1  # 1 + Pan & Scan crops


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # IGNORE where there is no loss
    images: list[ImageRef] = field(default_factory=list)
    origin: str = ""  # "file:line", for error messages and reports

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trainable(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE)


@dataclass
class VisionTokens:
    """What the template needs to know about the model's image tokens."""

    image_token_id: int
    boi_id: int
    eoi_id: int
    tokens_per_image: int


PAN_SCAN_INTRO = "Here is the original image "
PAN_SCAN_MIDDLE = " and here are some crops to help you see better "


def render(
    turns: list[Turn], tok: Tokenizer, vision: VisionTokens | None, train_on: TrainOn = "assistant"
) -> Sample:
    """Turns (already validated: optional system first, then user/assistant alternating)."""
    ids: list[int] = [tok.bos_id]
    labels: list[int] = [IGNORE]
    images: list[ImageRef] = []
    pending: list[tuple[str, bool]] = []  # text not yet tokenized, and whether it is trained

    def flush() -> None:
        # Tokenize each run of equally-trained text separately (runs only break after "model\n").
        for text, trained in pending:
            piece = tok.encode(text)
            ids.extend(piece)
            labels.extend(piece if trained else [IGNORE] * len(piece))
        pending.clear()

    def special(token_id: int, trained: bool) -> None:
        flush()
        ids.append(token_id)
        labels.append(token_id if trained else IGNORE)

    def text(s: str, trained: bool) -> None:
        if pending and pending[-1][1] == trained:
            pending[-1] = (pending[-1][0] + s, trained)
        else:
            pending.append((s, trained))

    def image_block(trained: bool) -> None:
        assert vision is not None
        text("\n\n", trained)
        special(vision.boi_id, trained)
        flush()
        ids.extend([vision.image_token_id] * vision.tokens_per_image)
        labels.extend([IGNORE] * vision.tokens_per_image)
        special(vision.eoi_id, trained)
        text("\n\n", trained)

    system = ""
    body = turns
    if turns and turns[0].role == "system":
        system = "".join(p for p in turns[0].parts if isinstance(p, str)).strip()
        body = turns[1:]
    last_reply = max((i for i, t in enumerate(body) if t.role == "assistant"), default=-1)
    for i, turn in enumerate(body):
        is_reply = turn.role == "assistant"
        trained = (train_on == "all") or (is_reply and (train_on == "assistant" or i == last_reply))
        role = "model" if is_reply else "user"
        special(tok.start_of_turn, False)
        text(role + "\n", train_on == "all")
        if i == 0 and system:
            text(system + "\n\n", train_on == "all")
        for part in turn.parts:
            if isinstance(part, str):
                text(part.strip(), trained)
                continue
            if vision is None:
                raise ValueError("an image was given to a text-only model")
            images.append(part)
            if part.views == 1:
                image_block(trained)
            else:
                text(PAN_SCAN_INTRO, trained)
                image_block(trained)
                text(PAN_SCAN_MIDDLE, trained)
                for k in range(part.views - 1):
                    if k:
                        text(" ", trained)
                    image_block(trained)
        special(tok.end_of_turn, trained)
        text("\n", train_on == "all")
    flush()
    return Sample(ids, labels, images)
