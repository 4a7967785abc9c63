"""Resume: the token count goes on, a longer max_steps rebuilds the lr schedule, a finished run
says so, and max_steps 0 is refused."""

from __future__ import annotations

import json
import math

import pytest
from trainutil import chat_set, write_recipe

from gemma3_tune.cli import main

LR = 5e-3


def _train_rows(run) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_resume_with_more_steps_rebuilds_schedule_and_keeps_tokens(tmp_path, tiny_dir, capsys):
    """4 steps (cosine, 1 warmup step), resumed to 7: step k (1-based) runs at
    lr * factor(k - 1), with factor 1 in warmup and 0.5 * (1 + cos(pi * (k - 2) / (total - 1)))
    after it, total being the run's length at the time: 4 for steps 1-4, 7 for steps 5-7
    (the first resumed step too: it ran at the old schedule's end lr, 0, before). The token
    count goes on: 16 samples pack into 4 rows, 2 steps per epoch, so after step 2k it is k
    times the data report's tokens per epoch (also across the resume: it restarted at 0)."""
    data = chat_set(tmp_path / "chat.jsonl", n=16)
    over = dict(training__max_steps=4, training__save_steps=2, training__warmup_steps=1)
    r = write_recipe(tmp_path / "r.yaml", tiny_dir, data, tmp_path / "run", **over)
    assert main(["train", str(r)]) == 0
    assert main(["train", str(r), "training.resume=true", "training.max_steps=7"]) == 0
    rows = _train_rows(tmp_path / "run")
    assert [x["step"] for x in rows] == list(range(1, 8))
    # by hand: steps 1-4 of 4: warmup, cos 0, cos(pi/3), cos(2pi/3); steps 5-7 of 7:
    # cos(pi/2), cos(2pi/3), cos(5pi/6)
    want = [1, 1, 0.75, 0.25, 0.5, 0.25, (1 - math.sqrt(3) / 2) / 2]
    assert [x["lr"] for x in rows] == pytest.approx([LR * f for f in want], rel=1e-9)

    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["rows"] == 4  # micro batch 2: two steps per epoch
    per_epoch = report["tokens"]
    assert [rows[k - 1]["tokens"] for k in (2, 4, 6)] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert all(b["tokens"] > a["tokens"] for a, b in zip(rows, rows[1:], strict=False))

    # Resuming the finished run again: one line saying so, and no eighth step
    capsys.readouterr()
    assert main(["train", str(r), "training.resume=true", "training.max_steps=7"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert err == [
        "error: training.resume: checkpoint-7 already completes this run (7 of 7 steps); set"
        " training.max_steps above 7 to train more (the lr schedule is rebuilt for the new"
        " length)"
    ]
    assert [x["step"] for x in _train_rows(tmp_path / "run")] == list(range(1, 8))


@pytest.mark.parametrize("steps", [0, -2])
def test_max_steps_zero_is_refused(tmp_path, tiny_dir, capsys, steps):
    data = chat_set(tmp_path / "chat.jsonl", n=4)
    r = write_recipe(tmp_path / "r.yaml", tiny_dir, data, tmp_path / "run")
    assert main(["train", str(r), f"training.max_steps={steps}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {r} (with overrides): training.max_steps: set a positive number of optimizer"
        f" steps, or -1 to train for training.epochs (got {steps})"
    ]
    assert not (tmp_path / "run").exists()
