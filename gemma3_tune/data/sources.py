"""Reading chat data and checking every sample, with errors that name the file and line.

Formats, one object per line (JSONL), or a JSON array, or a table (Parquet, Arrow,
`datasets.save_to_disk` folder):
- `{"messages": [{"role": "system"|"user"|"assistant", "content": STR | [PART, ...]}]}`
  with PART = `{"type": "text", "text": STR}` or `{"type": "image", "image": PATH}`;
- ShareGPT: `{"conversations": [{"from": "human"|"gpt"|"system", "value": STR}], "images": [PATH]}`
  with `<image>` marking where each image goes.

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

from .template import ImageRef, Turn

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
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
    for i, row in enumerate(ds):
        yield Record(f"{path}:row {i}", row)


# ---------------------------------------------------------------------------------------------
# Normalising one record into turns


def _resolve(image: object, origin: str, image_root: Path | None, base: Path) -> Path:
    if not isinstance(image, str) or not image:
        raise SampleError(origin, "an image entry must be a file path string")
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
    """Check the image opens (header only) and count its Pan & Scan views."""
    from PIL import Image

    from .images import MAX_IMAGE_PIXELS, pan_and_scan_crops  # torch: only for images

    if not path.is_file():
        raise SampleError(
            origin,
            f"image not found: {path} (relative paths resolve from data.image_root, else the data file's folder)",
        )
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise SampleError(origin, f"image too large: {path} ({w}x{h}); downscale it first")
            views = 1 + (len(pan_and_scan_crops(im, **pas_args)) if pan_and_scan else 0)
    except SampleError:
        raise
    except Exception as e:  # PIL raises several types for corrupt files
        raise SampleError(origin, f"cannot read image {path} ({e})") from None
    return ImageRef(str(path), views)


def to_turns(
    record: Record,
    *,
    image_root: Path | None = None,
    pan_and_scan: bool = False,
    pas_args: dict | None = None,
    base: Path | None = None,
) -> list[Turn]:
    """Validate one record and return its turns (system first, then user/assistant alternating)."""
    origin, data = record.origin, record.data
    if isinstance(data, SampleError):
        raise data
    if not isinstance(data, dict):
        raise SampleError(
            origin, "a sample must be a JSON object with 'messages' or 'conversations'"
        )
    base = base or Path(".")
    pas_args = pas_args or {}
    if "messages" in data and data["messages"] is not None:
        turns = _from_messages(data["messages"], origin, image_root, base, pan_and_scan, pas_args)
    elif "conversations" in data and data["conversations"] is not None:
        turns = _from_sharegpt(data, origin, image_root, base, pan_and_scan, pas_args)
    else:
        keys = ", ".join(sorted(map(str, data))) or "none"
        raise SampleError(origin, f"no 'messages' or 'conversations' key (keys: {keys})")
    _check_order(turns, origin)
    return turns


def _role(raw: object, origin: str, i: int) -> str:
    role = ROLE_ALIASES.get(raw) if isinstance(raw, str) else None
    if role is None:
        raise SampleError(
            origin, f"message {i}: unknown role {raw!r}; use system, user or assistant"
        )
    return role


def _from_messages(msgs, origin, image_root, base, pas, pas_args) -> list[Turn]:
    if not isinstance(msgs, list) or not msgs:
        raise SampleError(origin, "'messages' must be a non-empty list")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise SampleError(origin, f"message {i}: must be an object with 'role' and 'content'")
        role = _role(m.get("role"), origin, i)
        content = m.get("content")
        if content is None or content == "" or content == []:
            raise SampleError(origin, f"message {i} ({role}): missing content")
        parts: list = []
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif kind == "image":
                    src = part.get("image") or part.get("path")
                    parts.append(
                        _image_ref(_resolve(src, origin, image_root, base), origin, pas, pas_args)
                    )
                else:
                    raise SampleError(
                        origin,
                        f"message {i} part {j}: expected {{'type': 'text', 'text': ...}} or {{'type': 'image', 'image': PATH}}",
                    )
        else:
            raise SampleError(
                origin, f"message {i} ({role}): content must be a string or a list of parts"
            )
        if role != "user" and any(isinstance(p, ImageRef) for p in parts):
            raise SampleError(origin, f"message {i}: images are only supported in user messages")
        turns.append(Turn(role, parts))
    return turns


def _from_sharegpt(data, origin, image_root, base, pas, pas_args) -> list[Turn]:
    conv = data["conversations"]
    if not isinstance(conv, list) or not conv:
        raise SampleError(origin, "'conversations' must be a non-empty list")
    images = data.get("images") or []
    if isinstance(images, str):
        images = [images]
    n_placeholders = sum(
        str(m.get("value", "")).count("<image>") for m in conv if isinstance(m, dict)
    )
    if n_placeholders != len(images):
        raise SampleError(
            origin,
            f"{n_placeholders} <image> placeholder(s) but {len(images)} image(s) in 'images'; they must match",
        )
    refs = iter(
        _image_ref(_resolve(p, origin, image_root, base), origin, pas, pas_args) for p in images
    )
    turns = []
    for i, m in enumerate(conv):
        if not isinstance(m, dict):
            raise SampleError(
                origin, f"conversation turn {i}: must be an object with 'from' and 'value'"
            )
        role = _role(m.get("from"), origin, i)
        value = m.get("value")
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
        turns.append(Turn(role, parts))
    return turns


def _check_order(turns: list[Turn], origin: str) -> None:
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
    if not any(t.role == "assistant" for t in body):
        raise SampleError(origin, "no assistant reply to train on")
