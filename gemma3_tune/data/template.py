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

import json
from dataclasses import dataclass, field
from pathlib import Path
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


# Gemma 3's chat template (what the -it checkpoints ship), for folders that lack one.
CHAT_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = "
    "messages[0]['content'] + '\n\n' if messages[0]['content'] is string else "
    "messages[0]['content'][0]['text'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    '{%- else -%}{%- set first_user_prefix = "" -%}{%- set loop_messages = messages -%}{%- endif -%}'
    "{%- for message in loop_messages -%}{%- if message['role'] == 'assistant' -%}{%- set role = "
    "\"model\" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + "
    "role + '\n' + (first_user_prefix if loop.first else \"\") }}{%- if message['content'] is string "
    "-%}{{ message['content'] | trim }}{%- else -%}{%- for item in message['content'] -%}{%- if "
    "item['type'] == 'image' -%}{{ '<start_of_image>' }}{%- elif item['type'] == 'text' -%}{{ "
    "item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)


def ensure_chat_template(folder: Path) -> None:
    """Give a model folder Gemma 3's chat template the way published checkpoints carry it:
    `chat_template.jinja` (transformers 5, vLLM) and `chat_template` in tokenizer_config.json
    (older readers). A template the folder already has is kept, and written to both places."""
    cfg_file, jinja = folder / "tokenizer_config.json", folder / "chat_template.jinja"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    template = cfg.get("chat_template") or (jinja.read_text() if jinja.is_file() else CHAT_TEMPLATE)
    if not jinja.is_file():
        jinja.write_text(template)
    if cfg_file.is_file() and not cfg.get("chat_template"):
        cfg["chat_template"] = template
        cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
