"""Keys from TRL / HF TrainingArguments, Axolotl, LLaMA-Factory, Unsloth and torchtune get our
key in the recipe error, not the closest spelling (issue 25, item 6)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import BaseModel

from gemma3_tune.errors import UserError
from gemma3_tune.train.foreign_keys import FOREIGN_KEYS
from gemma3_tune.train.recipe import Recipe, load_recipe

BASE = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"


def _error(recipe: Path, overrides: list[str] = ()) -> str:
    with pytest.raises(UserError) as e:
        load_recipe(recipe, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (`X`, `X | None`, `list[X] | None`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in _models_in(a)]


def _schema_paths(model: type[BaseModel] = Recipe, prefix: str = "") -> set[str]:
    """Every dotted key of the recipe schema, sections included, walked from the models."""
    out = set()
    for name, field in model.model_fields.items():
        if name == "base_dir":
            continue
        out.add(prefix + name)
        for sub in _models_in(field.annotation):
            out |= _schema_paths(sub, prefix + name + ".")
    return out


def _recipe(tmp_path: Path, text: str) -> Path:
    (tmp_path / "d.jsonl").write_text("")
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


GOOD = "model:\n  path: m\ndata:\n  train: d.jsonl\n"


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            "training:\n  learning_rate: 1e-4\n",
            "unknown key training.learning_rate; did you mean training.lr?",
        ),
        (
            "training:\n  gradient_accumulation_steps: 4\n",
            "unknown key training.gradient_accumulation_steps; did you mean training.grad_accum?",
        ),
        ("bf16: true\n", "unknown key bf16; did you mean model.dtype: bfloat16?"),
    ],
    ids=["learning_rate", "gradient_accumulation_steps", "bf16"],
)
def test_the_issue_cases_get_our_key(tmp_path, extra, message):
    """The three hints the issue reports wrong (logging_steps, gradient_checkpointing, none)."""
    msg = _error(_recipe(tmp_path, GOOD + extra))
    assert message in msg and msg.startswith(str(tmp_path / "r.yaml")), msg


@pytest.mark.parametrize("place", ["", "training."], ids=["top", "training"])
@pytest.mark.parametrize("name", sorted(FOREIGN_KEYS))
def test_every_foreign_name_points_to_ours(name, place):
    """Wherever it is written (top level or a section), the hint is the table's key."""
    hint = FOREIGN_KEYS[name]
    msg = _error(BASE, [f"{place}{name}=1"])
    assert f"unknown key {place}{name}; " in msg, msg
    if hint.key is None:
        assert f"gemma3-tune has no {name}: {hint.note}" in msg, msg
    else:
        want = f"{hint.key}: {hint.value}" if hint.value else hint.key
        assert f"; did you mean {want}?" in msg, msg


def test_every_table_target_is_a_real_key_and_value():
    """The table cannot rot: each key (and each key named in a note) is a schema path, each
    suggested value validates, and no foreign name is one of our own names."""
    paths = _schema_paths()
    assert {"training.lr", "data.max_seq_len", "lora.r", "method"} <= paths  # the walk works
    named = re.compile(r"\b(?:model|lora|data|training|wandb|eval)\.[a-z_]+")
    for name, hint in FOREIGN_KEYS.items():
        targets = ([hint.key] if hint.key else []) + named.findall(hint.note)
        assert all(t in paths for t in targets), (name, targets)
        if hint.value:
            r = load_recipe(BASE, [f"{hint.key}={hint.value}"])
            got = r.model_dump(mode="json")
            for part in hint.key.split("."):
                got = got[part]
            assert got == yaml.safe_load(hint.value), (name, got)
    ours = {p.rsplit(".", 1)[-1] for p in paths}
    assert not ours & set(FOREIGN_KEYS)


@pytest.mark.parametrize(
    "override, key",
    [
        ("output_dir=runs/x", "training.output_dir"),
        ("seed=1", "training.seed"),
        ("gradient_checkpointing=true", "training.gradient_checkpointing"),
        ("micro_batch_size=2", "training.micro_batch_size"),
        ("weight_decay=0.1", "training.weight_decay"),
        ("save_steps=10", "training.save_steps"),
        ("eval_steps=10", "training.eval_steps"),
        ("logging_steps=10", "training.logging_steps"),
        ("lr=1e-4", "training.lr"),
        ("training.max_seq_len=512", "data.max_seq_len"),
        ("training.deepspeed=zero2", "deepspeed"),
        ("data.lora_r=8", "lora.r"),
    ],
)
def test_our_own_names_in_the_wrong_section_get_their_path(override, key):
    """HF and Axolotl keep these at the top level; ours live in a section."""
    where = override.split("=")[0]
    assert f"unknown key {where}; did you mean {key}?" in _error(BASE, [override])


def test_an_axolotl_recipe_is_told_about_its_keys_before_the_missing_sections(tmp_path):
    """`base_model` / `datasets` and no `model` / `data`: the unknown key explains the rest."""
    r = _recipe(tmp_path, "base_model: google/gemma-3-1b-it\ndatasets:\n  - path: d.jsonl\n")
    assert "unknown key base_model; did you mean model.path?" in _error(r)
