"""Every shipped recipe validates; recipe errors name the key and the closest valid one."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemma3_tune.errors import UserError
from gemma3_tune.train.recipe import describe_keys, load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_validates(path):
    r = load_recipe(path)
    assert r.data.train and r.training.output_dir


def test_overrides_are_typed():
    r = load_recipe(
        RECIPES[0], ["training.lr=3e-5", "data.packing=false", "lora.targets=[q_proj,v_proj]"]
    )
    assert (
        r.training.lr == 3e-5 and r.data.packing is False and r.lora.targets == ["q_proj", "v_proj"]
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.lrr=1", "unknown key training.lrr; did you mean training.lr?"),
        ("lora.rank=8", "unknown key lora.rank; did you mean lora.r?"),
        ("methd=lora", "unknown key methd; did you mean method?"),
        ("method=qlor", "method: Input should be 'lora', 'qlora', 'full' or 'none'"),
        (
            "training.micro_batch_size=0",
            "training.micro_batch_size: Input should be greater than 0",
        ),
        ("training.lr", "expected dotted.key=value"),
    ],
)
def test_bad_recipe_values_name_the_key(override, message):
    with pytest.raises(UserError) as e:
        load_recipe(RECIPES[0], [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_readme_documents_every_key():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [k for k, _, _ in describe_keys() if f"`{k}`" not in readme]
    assert not missing, missing
