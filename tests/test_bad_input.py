"""The bad-input suite: every mistake a user can make in a recipe, an override, a model
folder, an export target, data or images ends with a non-zero exit and one line that names the
file and line (or the key) and the fix. Never a traceback. (More data cases: test_bad_data.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from trainutil import chat_set, write_recipe

from gemma3_tune.cli import main

OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir):
    """A finished two-step LoRA run, for the export cases."""
    d = tmp_path_factory.mktemp("badrun")
    r = write_recipe(
        d / "r.yaml", tiny_dir, chat_set(d / "c.jsonl", n=8), d / "run", training__max_steps=2
    )
    assert main(["train", str(r), "training.save_steps=1"]) == 0
    return d / "run"


def _recipe(t: Path, text: str) -> Path:
    (t / "r.yaml").write_text(text)
    return t / "r.yaml"


def _good(t: Path, model: Path, extra: str = "") -> Path:
    (t / "d.jsonl").write_text(json.dumps(OK) + "\n")
    return _recipe(t, f"model:\n  path: {model}\ndata:\n  train: {t / 'd.jsonl'}\n{extra}")


def _png(path: Path) -> str:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    return str(path)


def _model_copy(t: Path, tiny: Path) -> Path:
    import shutil

    shutil.copytree(tiny, t / "m")
    return t / "m"


def _image_case(t: Path, tiny: Path, image: str) -> list[str]:
    (t / "imgs").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(t / "secret.png")
    msg = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": image}]},
            {"role": "assistant", "content": "x"},
        ]
    }
    (t / "d.jsonl").write_text(json.dumps(OK) + "\n" + json.dumps(msg) + "\n")
    r = _recipe(
        t, f"model:\n  path: {tiny}\ndata:\n  train: {t / 'd.jsonl'}\n  image_root: {t / 'imgs'}\n"
    )
    return ["data", "check", str(r)]


def _truncated_weights(t: Path, tiny: Path) -> list[str]:
    m = _model_copy(t, tiny)
    w = m / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    return ["train", str(_good(t, m))]


def _pickle_only(t: Path, tiny: Path) -> list[str]:
    m = _model_copy(t, tiny)
    (m / "model.safetensors").rename(m / "pytorch_model.bin")
    return ["train", str(_good(t, m))]


def _config_edit(t: Path, tiny: Path, text: str | None = None, **changes) -> list[str]:
    m = _model_copy(t, tiny)
    cfg = m / "config.json"
    if text is not None:
        cfg.write_text(text)
    else:
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **changes}))
    return ["train", str(_good(t, m))]


def _export_into_non_empty(t: Path, run: Path) -> list[str]:
    (t / "o").mkdir()
    (t / "o" / "f").write_text("keep me")
    return ["export", str(run), "--merge", "--out", str(t / "o")]


def _gguf_onto_folder(t: Path, run: Path) -> list[str]:
    (t / "x.gguf").mkdir()
    return ["export", str(run), "--format", "gguf", "--out", str(t / "x.gguf")]


def _unknown_format(t: Path, model: Path) -> list[str]:
    (t / "d.csv").write_text("hi")
    return [
        "data",
        "check",
        str(_recipe(t, f"model:\n  path: {model}\ndata:\n  train: {t / 'd.csv'}\n")),
    ]


# name -> (argv builder(tmp, tiny_dir, tiny_vision_dir, run), substrings of the one line)
CASES = {
    # recipes
    "recipe_missing": (
        lambda t, m, v, r: ["train", str(t / "nope.yaml")],
        ["nope.yaml", "no such recipe"],
    ),
    "recipe_yaml_syntax": (
        lambda t, m, v, r: ["train", str(_recipe(t, "model:\n  path: x\ndata: [unclosed\n"))],
        ["r.yaml:4", "invalid YAML"],
    ),
    "recipe_not_mapping": (
        lambda t, m, v, r: ["train", str(_recipe(t, "- a\n- b\n"))],
        ["r.yaml", "mapping"],
    ),
    "recipe_unknown_key": (
        lambda t, m, v, r: ["train", str(_good(t, m, "trainig:\n  lr: 1e-4\n"))],
        ["unknown key trainig", "did you mean training"],
    ),
    "recipe_bad_type": (
        lambda t, m, v, r: ["train", str(_good(t, m, "training:\n  lr: fast\n"))],
        ["training.lr", "'fast'"],
    ),
    "recipe_missing_model": (
        lambda t, m, v, r: ["train", str(_recipe(t, "data:\n  train: d.jsonl\n"))],
        ["missing required key model"],
    ),
    "recipe_bad_lora_target": (
        lambda t, m, v, r: ["train", str(_good(t, m, "lora:\n  targets: [qkv]\n"))],
        ["lora.targets", "'qkv'"],
    ),
    "recipe_bad_deepspeed": (
        lambda t, m, v, r: ["train", str(_good(t, m, "deepspeed: zero9\n"))],
        ["deepspeed", "zero9"],
    ),
    "recipe_negative_lr": (
        lambda t, m, v, r: ["train", str(_good(t, m, "training:\n  lr: -1\n"))],
        ["training.lr", "greater than 0"],
    ),
    # overrides
    "override_no_equals": (
        lambda t, m, v, r: ["train", str(_good(t, m)), "training.lr"],
        ["training.lr", "dotted.key=value"],
    ),
    "override_unknown_key": (
        lambda t, m, v, r: ["train", str(_good(t, m)), "training.lrr=1"],
        ["unknown key training.lrr", "did you mean training.lr"],
    ),
    "override_bad_value": (
        lambda t, m, v, r: ["train", str(_good(t, m)), "training.micro_batch_size=0"],
        ["training.micro_batch_size", "greater than 0"],
    ),
    "override_not_section": (
        lambda t, m, v, r: ["train", str(_good(t, m)), "model.path.x=1"],
        ["model.path.x=1", "not a section"],
    ),
    "override_into_a_value": (
        lambda t, m, v, r: ["train", str(_good(t, m)), "method.r=4"],
        ["r.yaml (with overrides): method", "Input should be 'lora'"],
    ),
    "override_bad_choice": (
        lambda t, m, v, r: ["train", str(_good(t, m)), "method=lora2"],
        ["method", "'lora2'"],
    ),
    # model folders
    "model_missing": (
        lambda t, m, v, r: ["train", str(_good(t, t / "gone"))],
        ["gone", "model.path"],
    ),
    "model_no_config": (
        lambda t, m, v, r: ["train", str(_good(t, t))],
        ["model.path", "no config.json"],
    ),
    "model_config_not_json": (
        lambda t, m, v, r: _config_edit(t, m, text='{"model_type": "gemma3_text",\n oops}'),
        ["config.json:2", "invalid JSON"],
    ),
    "model_not_gemma3": (
        lambda t, m, v, r: _config_edit(t, m, model_type="llama"),
        ["config.json", "'llama'", "gemma3"],
    ),
    "model_pickle_only": (lambda t, m, v, r: _pickle_only(t, m), ["pickle", "safetensors only"]),
    "model_truncated_weights": (
        lambda t, m, v, r: _truncated_weights(t, m),
        ["model.safetensors", "not a readable safetensors file"],
    ),
    "model_shape_mismatch": (
        lambda t, m, v, r: _config_edit(t, m, hidden_size=80),
        ["config.json implies"],
    ),
    "model_unknown_embedded": (
        lambda t, m, v, r: ["train", str(_good(t, "gguf:gemma4-1b"))],
        ["gguf:gemma4-1b", "available"],
    ),
    # export targets
    "export_not_a_run": (
        lambda t, m, v, r: ["export", str(t), "--merge", "--out", str(t / "o")],
        ["neither a model folder", "nor a run directory"],
    ),
    "export_out_not_empty": (
        lambda t, m, v, r: _export_into_non_empty(t, r),
        ["--out", "not empty", "--force"],
    ),
    "export_gguf_not_gguf_name": (
        lambda t, m, v, r: ["export", str(r), "--format", "gguf", "--out", str(t / "model.bin")],
        ["*.gguf"],
    ),
    "export_missing_checkpoint": (
        lambda t, m, v, r: [
            "export",
            str(r),
            "--merge",
            "--checkpoint",
            "99",
            "--out",
            str(t / "o"),
        ],
        ["checkpoint-99", "complete ones: 1, 2"],
    ),
    "export_gguf_onto_folder": (
        lambda t, m, v, r: _gguf_onto_folder(t, r),
        ["x.gguf", "folder"],
    ),
    # data and images
    "data_file_missing": (
        lambda t, m, v, r: [
            "data",
            "check",
            str(_recipe(t, f"model:\n  path: {m}\ndata:\n  train: {t / 'no.jsonl'}\n")),
        ],
        ["no.jsonl"],
    ),
    "data_unknown_format": (
        lambda t, m, v, r: _unknown_format(t, m),
        ["d.csv", "unsupported data file type '.csv'", ".jsonl"],
    ),
    "image_escapes_root": (
        lambda t, m, v, r: _image_case(t, v, "../secret.png"),
        ["d.jsonl:2", "leaves data.image_root"],
    ),
    "image_url": (
        lambda t, m, v, r: _image_case(t, v, "https://example.com/a.png"),
        ["d.jsonl:2", "not fetched"],
    ),
    "recipe_is_a_data_file": (
        lambda t, m, v, r: ["train", str(chat_set(t / "chats.jsonl", n=2))],
        ["chats.jsonl", "looks like a data file", "data.train"],
    ),
    "recipe_is_json_lines": (
        lambda t, m, v, r: [
            "data",
            "check",
            str(_recipe(t, json.dumps(OK) + "\n" + json.dumps(OK))),
        ],
        ["r.yaml", "looks like a data file"],
    ),
    "generate_without_prompt": (
        lambda t, m, v, r: ["generate", str(r)],
        ["--prompt is required"],
    ),
    "generate_image_missing": (
        lambda t, m, v, r: ["generate", str(r), "--prompt", "hi", "--image", str(t / "no.png")],
        ["--image", "no.png", "no such file"],
    ),
    "generate_image_on_text_model": (
        lambda t, m, v, r: ["generate", str(m), "--prompt", "hi", "--image", _png(t / "a.png")],
        ["text-only"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line(case, tmp_path, tiny_dir, tiny_vision_dir, run, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build, needles = CASES[case]
    argv = build(tmp_path, tiny_dir, tiny_vision_dir, run)
    capsys.readouterr()
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.strip().splitlines() if not x.startswith("warning:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
