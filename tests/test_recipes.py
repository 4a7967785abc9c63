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
    assert (r.data.train or r.qat.data) and r.training.output_dir


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


def test_recipe_reference_documents_every_key():
    """docs/recipe-reference.md is what scripts/recipe_reference.py makes of the schema now:
    every key, with its current default and description (regenerate it when the schema moves)."""
    import runpy

    root = Path(__file__).parent.parent
    page = (root / "docs" / "recipe-reference.md").read_text()
    missing = [k for k, _, _ in describe_keys() if f"| `{k}` |" not in page]
    assert not missing, missing
    generator = runpy.run_path(str(root / "scripts" / "recipe_reference.py"))
    assert page == generator["page"](), (
        "run: python scripts/recipe_reference.py > docs/recipe-reference.md"
    )


def test_dtype_auto_is_valid_and_the_default(tmp_path):
    """model.dtype: auto validates and is what an unset key means."""
    p = tmp_path / "r.yaml"
    p.write_text("model: {path: m}\ndata: {train: d.jsonl}\n")
    assert load_recipe(p).model.dtype == "auto"
    assert load_recipe(p, ["model.dtype=auto"]).model.dtype == "auto"
    assert load_recipe(p).training.compile == "auto"
    assert load_recipe(p, ["training.compile=false"]).training.compile is False
    with pytest.raises(UserError, match="training.compile"):
        load_recipe(p, ["training.compile=sometimes"])


CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {extra}\nbugs\t\t: none\n"


@pytest.mark.parametrize(
    "extra,want,why",
    [
        ("avx512_bf16 avx512_vnni", "bfloat16", "(CPU has AVX512-BF16)"),
        ("amx_tile amx_bf16 amx_int8", "bfloat16", "(CPU has AMX)"),
        ("avx512_vnni", "float32", "(CPU has no AVX512-BF16 or AMX"),
    ],
)
def test_dtype_auto_follows_the_cpus_bf16_support(extra, want, why, tmp_path, monkeypatch, capsys):
    """On a CPU, auto is bf16 only where the flags say bf16 matmuls are native; the choice is
    printed once, with its reason."""
    import torch

    from gemma3_tune.model import dtypes

    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO.format(extra=extra))
    monkeypatch.setattr(dtypes, "CPUINFO", info)
    monkeypatch.setattr(dtypes, "_announced", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dtypes.resolve_dtype("auto") == getattr(torch, want)
    dtypes.announce_auto()
    dtypes.announce_auto()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"dtype auto -> {want} {why}"), err
    assert dtypes.resolve_dtype("float32") == torch.float32  # explicit dtypes are kept
    info.unlink()  # no /proc/cpuinfo (macOS, Windows): the safe side
    assert dtypes.resolve_dtype("auto") == torch.float32


def test_ddp_timeout_reaches_the_process_group_settings(tmp_path):
    from gemma3_tune.train.args import build_args

    p = tmp_path / "r.yaml"
    p.write_text("model: {path: m}\ndata: {train: d.jsonl}\n")
    assert load_recipe(p).training.ddp_timeout == 1800
    args = build_args(load_recipe(p, ["training.ddp_timeout=77"]), tmp_path / "out", False)
    assert args.ddp_timeout == 77
