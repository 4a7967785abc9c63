"""Output to a file is the console minus the bars: no progress-bar redraws (`\r`, `%|`) in what
train, eval, distillation (teacher answers and targets) and DPO (reference log-probs) write when
stderr is not a terminal (here: pytest's captured file descriptors)."""

from __future__ import annotations

import pytest
from test_preference_train import pair_set
from trainutil import chat_set, write_recipe

from gemma3_tune.cli import main


def _no_bars(capfd) -> str:
    out, err = capfd.readouterr()
    text = out + err
    assert "\r" not in text and "%|" not in text, text[-2000:]
    return text


@pytest.mark.parametrize("objective", ["sft", "distill", "dpo"])
def test_train_and_eval_write_no_bars_to_a_file(objective, tmp_path, tiny_dir, capfd):
    """Each run also holds out data (the end-of-run eval and the evaluation loop draw bars on
    a terminal), and distillation answers prompt-only rows (the teacher's answer bar)."""
    over = {
        "data__cache_dir": str(tmp_path / "cache"),
        "data__eval_split": 0.25,
        "training__max_steps": 2,
        "training__save_steps": 100,
    }
    data = chat_set(tmp_path / "c.jsonl", n=16)
    if objective == "distill":
        over["distill"] = {"teacher": str(tiny_dir)}
    elif objective == "dpo":
        data, over["objective"] = pair_set(tmp_path / "p.jsonl"), "dpo"
    else:
        over["eval__metric"] = ["exact"]
    r = write_recipe(tmp_path / "r.yaml", tiny_dir, data, tmp_path / "run", **over)
    capfd.readouterr()
    assert main(["train", str(r)]) == 0
    assert "step 2/2" in _no_bars(capfd)
    if objective == "sft":
        held = chat_set(tmp_path / "held.jsonl", n=4, seed=9)
        argv = ["eval", str(tmp_path / "run"), str(tiny_dir), "--data", str(held)]
        assert main([*argv, "--max-new-tokens", "4"]) == 0
        assert "| target |" in _no_bars(capfd)
