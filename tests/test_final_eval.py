"""The final evaluation: with eval data, the last step always has an eval row (issue 24).

`training.eval_steps` unset means "at the end"; set, it means every N steps and at the end,
with one evaluation at a last step that N divides (as Axolotl and torchtune users expect).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from trainutil import chat_set, write_recipe

from gemma3_tune.cli import main

IGNORE = -100


def rows_of(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def eval_rows(run):
    return [r for r in rows_of(run) if "eval_loss" in r]


def reference_eval_loss(recipe_path, run) -> float:
    """What HF's `Trainer.evaluate` computes, by hand, from the saved adapter merged onto the
    base with peft and the same eval rows (`load_data`, the prepared cache the run used).

    TRL's `prediction_step` calls `compute_loss` without `num_items_in_batch`, so each eval
    batch's loss is the model's mean over that batch's labelled tokens (next-token shifted).
    `evaluation_loop` repeats it `eval_batch_size` times and accelerate's `gather_for_metrics`
    cuts the last batch's repeats to the rows it really has, so `eval_loss` is the mean of the
    batch means weighted by the rows in each batch (a short last batch counts for its rows).
    Each document is scored alone: documents never attend to each other (a packed row's
    positions restart at 0), and a document's first label is never a target.
    """
    from gemma3_tune.export.inference import load_with_adapter, resolve_run
    from gemma3_tune.train.recipe import load_recipe
    from gemma3_tune.train.run_data import load_data

    recipe = load_recipe(recipe_path)
    _, _, data = load_data(recipe)
    rows = data.eval_rows
    model = load_with_adapter(*resolve_run(run)).eval()
    bs = recipe.training.micro_batch_size
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), bs):
            nll, count = torch.zeros((), dtype=torch.float64), 0
            for sample in (s for row in rows[i : i + bs] for s in row):
                ids = torch.tensor([sample.input_ids])
                logits = model(ids, position_ids=torch.arange(ids.shape[1])[None]).logits[0]
                targets = torch.tensor(sample.labels[1:])  # position t predicts token t+1
                nll += F.cross_entropy(
                    logits[:-1].double(), targets, ignore_index=IGNORE, reduction="sum"
                )
                count += int((targets != IGNORE).sum())
            total += (nll / count).item() * len(rows[i : i + bs])
    return total / len(rows)


def test_eval_split_without_eval_steps_evaluates_at_the_end(tmp_path, tiny_dir, capsys):
    """No eval_steps: one eval row, at the last step, equal to the loss computed by hand; the
    console prints it, the model card reports it, the final checkpoint's trainer state records
    it. Resuming the finished run is refused (it would train a step 7 at lr 0) and evaluates
    nothing again."""
    data = chat_set(tmp_path / "chat.jsonl", n=25)
    # unpacked: 5 eval rows, so batches of 2, 2 and 1 (the weighting of a short last batch)
    r = write_recipe(
        tmp_path / "r.yaml", tiny_dir, data, tmp_path / "run",
        training__max_steps=6, training__save_steps=1000, data__eval_split=0.2,
        data__packing=False,
    )  # fmt: skip
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", str(r)]) == 0
    err = capsys.readouterr().err
    evals = eval_rows(run)
    assert [e["step"] for e in evals] == [6], rows_of(run)
    (ev,) = evals
    assert ev["eval_perplexity"] == pytest.approx(math.exp(ev["eval_loss"]), rel=1e-12)
    assert len([x for x in rows_of(run) if "loss" in x]) == 6
    assert ev["eval_loss"] == pytest.approx(reference_eval_loss(r, run), abs=1e-5)

    line = f"eval 6/6  loss {ev['eval_loss']:.4f}  perplexity {ev['eval_perplexity']:.2f}"
    assert line in err.splitlines(), err
    card = (
        f"| eval loss | {ev['eval_loss']:.4f} (perplexity {ev['eval_perplexity']:.2f}) at step 6 |"
    )
    for readme in (run / "README.md", run / "adapter" / "README.md"):
        assert card in readme.read_text()
    state = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "eval_loss" in h] == [6]

    assert main(["train", str(r), "training.resume=true"]) == 2  # finished: refused, no step 7
    assert "checkpoint-6 already completes this run (6 of 6 steps)" in capsys.readouterr().err
    assert eval_rows(run) == evals


@pytest.mark.parametrize(
    ("eval_steps", "held_out", "want"),
    [(4, False, [4, 6]), (3, False, [3, 6]), (None, True, [6])],
)
def test_eval_steps_and_the_last_step(eval_steps, held_out, want, tmp_path, tiny_dir):
    """eval_steps=4 over 6 steps: 4, and 6 at the end; eval_steps=3: 3 and 6, once each; a
    held-out file (data.eval) and no eval_steps: 6."""
    data = chat_set(tmp_path / "chat.jsonl", n=25)
    if held_out:
        source = {"data__eval": str(chat_set(tmp_path / "held.jsonl", n=3, seed=1))}
    else:
        source = {"data__eval_split": 0.2}
    r = write_recipe(
        tmp_path / "r.yaml", tiny_dir, data, tmp_path / "run",
        training__max_steps=6, training__save_steps=1000, training__eval_steps=eval_steps,
        **source,
    )  # fmt: skip
    assert main(["train", str(r)]) == 0
    assert [e["step"] for e in eval_rows(tmp_path / "run")] == want
