"""Walking the recipe schema (pydantic models): every key's dotted path, default and
description, for `train --help` and docs/recipe-reference.md; and a validation error as one
line, with the key to write instead of an unknown one (another tool's name for ours, ours in
the wrong section, or the closest spelling)."""

from __future__ import annotations

import difflib
import json
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError

from ..data.settings import Source
from .foreign_keys import FOREIGN_KEYS


def keys_of(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every key of a schema, sections walked."""
    from pydantic_core import PydanticUndefined

    out = []
    for name, f in model.model_fields.items():
        if name == "base_dir":
            continue
        key = prefix + name
        ann = f.annotation
        sub = [
            a
            for a in (ann, *getattr(ann, "__args__", ()))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if sub and sub[0] is not Source:
            out += keys_of(sub[0], key + ".")
            continue
        default = "required" if f.default is PydanticUndefined else json_default(f.default)
        doc = f.description or ""
        if choices := _choices(ann):
            doc += f" (one of: {', '.join(choices)})"
        out.append((key, default, doc))
    return out


def _choices(ann: object) -> list[str]:
    """The allowed values of a Literal annotation (also inside `bool | Literal[...]`)."""
    if get_origin(ann) is Literal:
        return [json_default(v).strip('"') for v in get_args(ann)]
    parts = [a for a in get_args(ann) if a is not type(None)]
    found = [c for a in parts for c in _choices(a)]
    if found and bool in parts:
        found = ["true", "false", *found]
    return found


def json_default(v: object) -> str:
    return json.dumps(v) if v is not None else "null"


def _fields(model: type[BaseModel]) -> list[str]:
    return [n for n in model.model_fields if n != "base_dir"]


def _section_model(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        inner = [
            a
            for a in getattr(ann, "__args__", (ann,))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not inner:
            # list[Source] and similar
            args = [x for a in getattr(ann, "__args__", ()) for x in getattr(a, "__args__", (a,))]
            inner = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return None
        model = inner[0]
    return model


def _our_paths(root: type[BaseModel]) -> dict[str, str]:
    """Each of our key names that occurs once in the schema -> its dotted path (`lr` ->
    `training.lr`), sections included (`lora`), to place a key written in the wrong section."""
    paths = [k for k, _, _ in keys_of(root)] + _fields(root)
    leaves: dict[str, list[str]] = {}
    for p in dict.fromkeys(paths):
        leaves.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    return {leaf: ps[0] for leaf, ps in leaves.items() if len(ps) == 1}


def _unknown_key_hint(root: type[BaseModel], loc: tuple) -> str:
    """What to write instead of an unknown key: another tool's name for one of ours (checked
    first: `learning_rate` is not `logging_steps`), one of ours in the wrong section, or the
    closest spelling in its own section."""
    given = str(loc[-1])
    if given in FOREIGN_KEYS:
        return "; " + FOREIGN_KEYS[given].text(given)
    if given in (ours := _our_paths(root)):
        return f"; did you mean {ours[given]}?"
    parent = _section_model(root, loc[:-1]) or root
    close = difflib.get_close_matches(given, _fields(parent), n=1, cutoff=0.5)
    close = close or [f for f in _fields(parent) if given.startswith(f) or f.startswith(given)][:1]
    return f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?" if close else ""


def explain(root: type[BaseModel], e: ValidationError, source: str) -> str:
    """The first error of a validation against `root`, as one line for `source` (a file)."""
    # An unknown key first: `datasets:` explains a missing `data:` better than the reverse.
    errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
    err = errors[0]
    loc = tuple(err["loc"])
    key = ".".join(str(x) for x in loc)
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key {key}{_unknown_key_hint(root, loc)}"
    if err["type"] == "missing":
        return f"{source}: missing required key {key}"
    if err["type"] == "value_error" and isinstance(err.get("input"), dict):
        return f"{source}: {err['msg'].removeprefix('Value error, ')}"  # a section's own check
    return f"{source}: {key}: {err['msg']} (got {err.get('input')!r})"
