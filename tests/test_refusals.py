"""train/refusals.py: every combination we do not train is refused by `gemma3-tune train` in one
line, before the data or the model is touched (no output folder is made), and the same recipe
without the offending setting passes the check."""

from __future__ import annotations

import pytest
from trainutil import chat_set, write_recipe

from gemma3_tune.cli import main
from gemma3_tune.train.recipe import load_recipe
from gemma3_tune.train.refusals import refuse, zero_stage

CASES = [
    ({"method": "qlora", "qat": {"format": "q4_0"}}, "qat: method qlora does not train"),
    ({"lora": {"r": 8, "alpha": 16, "dropout": 0.0, "use_dora": True}, "qat": {"format": "q4_0"}},
     "qat: DoRA's merged weight"),
    ({"qat": {"format": "q4_0", "target": "teacher"}, "distill": {"teacher": "TINY"}},
     "qat.target: teacher distils from the model itself"),
    ({"objective": "dpo", "distill": {"teacher": "TINY"}}, "objective: dpo trains on preference pairs"),
    ({"objective": "orpo", "qat": {"format": "q4_0"}}, "qat cannot be combined with objective: orpo"),
    ({"distill": {"teacher": "TINY", "cache": False}, "data__feature_cache": "FEATURES"},
     "distill.cache: false runs the teacher in each step"),
    ({"method": "qlora", "deepspeed": "zero3"}, "method: qlora cannot be combined with ZeRO-3"),
    ({"qat": {"format": "q4_0"}, "deepspeed": "zero3_offload"}, "qat cannot be combined with ZeRO-3"),
    ({"training__compile": True, "deepspeed": "zero3"}, "training.compile: true cannot be combined"),
    ({"deepspeed": "zero9"}, "deepspeed: 'zero9' is neither zero2, zero3, zero3_offload"),
    ({"embedding_lr": 1e-4}, "embedding_lr: set train_embeddings: true too"),
    ({"method": "full", "embedding_lr": 1e-4}, "embedding_lr: set train_embeddings: true too"),
    ({"method": "none", "train_embeddings": True, "train_projector": True},
     "train_embeddings: method none trains the projector only"),
]  # fmt: skip


def _recipe(tmp_path, tiny_dir, over: dict):
    over = {k: (str(tiny_dir) if v == "TINY" else v) for k, v in over.items()}
    for section in over.values():
        if isinstance(section, dict) and section.get("teacher") == "TINY":
            section["teacher"] = str(tiny_dir)
    if over.get("data__feature_cache") == "FEATURES":
        over["data__feature_cache"] = str(tmp_path / "features")
    data = chat_set(tmp_path / "chat.jsonl", n=4)
    return write_recipe(tmp_path / "r.yaml", tiny_dir, data, tmp_path / "run", **over)


@pytest.mark.parametrize("over,message", CASES)
def test_refused_in_one_line_before_anything_runs(over, message, tmp_path, tiny_dir, capsys):
    r = _recipe(tmp_path, tiny_dir, over)
    assert main(["train", str(r)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert message in err, err
    assert not (tmp_path / "run").exists()


def test_the_same_recipes_without_the_clash_pass(tmp_path, tiny_dir):
    for over in ({"qat": {"format": "q4_0"}}, {"deepspeed": "zero2", "training__compile": True},
                 {"objective": "orpo"}, {"method": "qlora", "deepspeed": "zero2"},
                 {"train_embeddings": True, "embedding_lr": 1e-4, "deepspeed": "zero3"},
                 {"method": "full", "train_embeddings": False}):  # fmt: skip
        refuse(load_recipe(_recipe(tmp_path, tiny_dir, over)))


def test_zero_stage_reads_the_config(tmp_path, tiny_dir):
    assert zero_stage(load_recipe(_recipe(tmp_path, tiny_dir, {}))) is None
    for name, stage in (("zero2", 2), ("zero3", 3), ("zero3_offload", 3)):
        assert zero_stage(load_recipe(_recipe(tmp_path, tiny_dir, {"deepspeed": name}))) == stage
    own = tmp_path / "ds.json"
    own.write_text('{"zero_optimization": {"stage": 3}}')
    assert zero_stage(load_recipe(_recipe(tmp_path, tiny_dir, {"deepspeed": str(own)}))) == 3
