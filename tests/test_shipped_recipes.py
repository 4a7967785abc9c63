"""Every shipped recipe runs as shipped: `gemma3-tune data check` on it, from a checkout, after
only what its comments say to run first. The recipes whose data and model are the user's own
(`data/my_chat.jsonl`, `models/gemma-3-4b-it`, ...) get a tiny stand-in at the paths they name,
since they are templates; everything else is the repository's own files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from trainutil import chat_set, colour_set

from gemma3_tune.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = {"tiny-lora": "tiny", "tiny-vision": "tiny-vision"}  # `init-model` per their comments
EMBEDDED = ["quickstart", "tools-270m", "dpo-quickstart"]  # gguf:gemma3-270m, bundled data
AFTER_QUICKSTART = {  # what their comments say to run first: an HF folder of the 270M there
    "distill-quickstart": "runs/quickstart/merged",
    "quickstart-qat": "runs/quickstart/merged",
    "grpo-contacts": "runs/quickstart-12/merged",
}
AFTER_SCRIPT = {"cpt-transformers": "make_cpt_corpus"}  # its corpus, made from transformers
SELF_DATA = ["qat-base-270m"]  # its data: text the model samples itself when it trains
TEMPLATES = {  # the user's own model and data
    "chat-lora-1b": "tiny",
    "chat-lora-4b": "tiny-vision",
    "full-sft-1b": "tiny",
    "qlora-27b": "tiny-vision",
    "vision-adapter-4b": "tiny-vision",
    "zero3-multinode-27b": None,  # absolute /shared paths: validated only (test_recipes)
}


def test_every_recipe_is_covered():
    shipped = {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    assert shipped == {*TINY, *EMBEDDED, *AFTER_QUICKSTART, *AFTER_SCRIPT, *TEMPLATES, *SELF_DATA}


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A working directory with the repository's recipes/ and data/ (read-only links)."""
    for name in ("recipes", "data", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _check(name: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["data", "check", f"recipes/{name}.yaml", "--json"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    if "await the teacher's answer" in out:  # distillation: prompt-only rows, counted
        return {"samples": int(out.split("prompt-only")[1].split()[0])}
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_recipes_run_as_shipped(name, checkout, capsys):
    assert main(["init-model", "--preset", TINY[name], "--out", f"models/{TINY[name]}"]) == 0
    assert _check(name, capsys)["samples"] > 0


@pytest.mark.parametrize("name", sorted(n for n, p in TEMPLATES.items() if p))
def test_template_recipes_check_with_stand_ins(name, checkout, capsys):
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
    model = Path(recipe["model"]["path"])
    assert main(["init-model", "--preset", TEMPLATES[name], "--out", str(model)]) == 0
    d = recipe["data"]
    train = Path(d["train"] if isinstance(d["train"], str) else d["train"][0]["path"])
    (checkout / "user").mkdir()
    os.replace(checkout / "data", checkout / "user" / "data-link")  # data/ becomes the user's
    train.parent.mkdir(parents=True, exist_ok=True)
    if "image_root" in d:
        made = colour_set(Path(d["image_root"]), 8, seed=0)
        train.write_text(made.read_text())
    else:
        chat_set(train, n=8)
    report = _check(name, capsys)
    assert report["samples"] + report.get("eval_samples", 0) == 8, report


@pytest.fixture
def embedded(real_270m, checkout, monkeypatch):
    """`gguf:gemma3-270m` from this session's import of the packaged GGUF."""
    cache = checkout / "cache"
    cache.mkdir()
    (cache / "gemma3-270m").symlink_to(real_270m[1])
    monkeypatch.setenv("GEMMA3_TUNE_CACHE", str(cache))
    return real_270m[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", EMBEDDED + sorted(AFTER_QUICKSTART))
def test_270m_recipes_run_as_shipped(name, embedded, checkout, capsys):
    if name in AFTER_QUICKSTART:  # the merged folder their comments make: the 270M stands in
        merged = checkout / AFTER_QUICKSTART[name]
        merged.parent.mkdir(parents=True)
        merged.symlink_to(embedded)
    assert _check(name, capsys)["samples"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(AFTER_SCRIPT))
def test_recipes_after_their_script_run_as_shipped(name, embedded, checkout, capsys):
    """The script its comment names writes the data (into the checkout's own data/, whose
    other entries link to the repository's), then data check passes."""
    import importlib.util

    (checkout / "data").unlink()
    (checkout / "data").mkdir()
    for entry in (ROOT / "data").iterdir():
        if entry.name != "cpt":  # a corpus made in the repository is not this one
            (checkout / "data" / entry.name).symlink_to(entry)
    path = ROOT / "scripts" / f"{AFTER_SCRIPT[name]}.py"
    spec = importlib.util.spec_from_file_location(AFTER_SCRIPT[name], path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main()
    report = _check(name, capsys)
    assert report["text_documents"] > 100 and report["text_windows"] > report["text_documents"]


@pytest.mark.parametrize("name", SELF_DATA)
def test_self_data_recipes_check_as_shipped(name, embedded, checkout, capsys):
    """qat.data: [self]: `data check` says the texts await sampling (`train` samples them);
    it loads no model."""
    argv = ["data", "check", f"recipes/{name}.yaml", f"data.cache_dir={checkout / 'cache'}"]
    assert main(argv) == 0
    assert "await sampling" in capsys.readouterr().out
