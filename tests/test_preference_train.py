"""DPO and ORPO end to end on tiny models: reference log-probs (computed once, equal to the
plain logits' numbers, reused), the first step at ln 2, TRL's metric names, images, refusals."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from test_distill import make_teacher
from trainutil import COLOURS, colour_set, write_recipe

from gemma3_tune.cli import main
from gemma3_tune.data.preference import render_pair
from gemma3_tune.data.sources import Record
from gemma3_tune.data.tokenizer import Tokenizer
from gemma3_tune.model.checkpoint import load_model


def pair_set(path, n: int = 24, seed: int = 0):
    """Replies that repeat the question's number (chosen) or another one (rejected)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k, m = rng.sample(range(10), 2)
        rows.append(
            {
                "prompt": f"number {k}",
                "chosen": f"the answer is {k} {k}",
                "rejected": f"the answer is {m} {m}",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows_of(run, key: str):
    out = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in out if key in r]


def dpo_recipe(tmp_path, model_dir, data, name="run", **over):
    over = {
        "objective": "dpo",
        "data__cache_dir": str(tmp_path / "cache"),
        "data__eval_split": 0.25,
        "training__max_steps": 3,
        "training__save_steps": 100,
        "training__logging_steps": 1,
        **over,
    }
    return write_recipe(tmp_path / f"{name}.yaml", model_dir, data, tmp_path / name, **over)


def dense_reply_logps(model, tok, record: Record) -> list[float]:
    """The obvious computation: each document alone, full logits, log_softmax, the labelled
    next tokens summed."""
    s = render_pair(record, tok, None, {})
    out = []
    for a, b in [(0, s.split), (s.split, len(s))]:
        ids = torch.tensor([s.input_ids[a:b]])
        labels = torch.tensor(s.labels[a:b])
        with torch.no_grad():
            logits = model(ids).logits[0].double()  # [T, V]
        lp = torch.log_softmax(logits[:-1], -1)
        tgt = labels[1:]
        keep = tgt != -100
        out.append(float(lp[keep].gather(-1, tgt[keep, None]).sum()))
    return out


def test_dpo_trains_from_ln2_with_a_cached_reference(tmp_path, tiny_dir, capsys):
    data = pair_set(tmp_path / "pairs.jsonl")
    r = dpo_recipe(tmp_path, tiny_dir, data)
    assert main(["train", str(r)]) == 0
    err = capsys.readouterr().err
    assert "loading reference base" in err and "reference log-probs: 24 pairs" in err
    train = rows_of(tmp_path / "run", "loss")
    # The policy starts as the reference (LoRA's B = 0): every reward 0, loss ln 2.
    assert abs(train[0]["loss"] - math.log(2)) < 1e-5
    assert abs(train[0]["rewards/margins"]) < 1e-5
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen"):
        assert key in train[0]
    evals = rows_of(tmp_path / "run", "eval_loss")
    assert "eval_rewards/accuracies" in evals[-1] and "eval_perplexity" not in evals[-1]
    # it learns the preference: held-out pairs move the right way
    assert evals[-1]["eval_rewards/margins"] > 0 and evals[-1]["eval_loss"] < math.log(2)
    card = (tmp_path / "run" / "README.md").read_text()
    assert "DPO (sigmoid loss, beta 0.1) on preference pairs, reference `base`" in card
    # The cache holds, per prepared pair, the plain logits' reply log-probs of the base model.
    (folder,) = (tmp_path / "cache" / "reference").iterdir()
    logps = np.load(folder / "logps.npy")
    model, tok = load_model(tiny_dir, dtype=torch.float32).eval(), Tokenizer(tiny_dir)
    lines = data.read_text().splitlines()
    import datasets

    (prepared,) = [p for p in (tmp_path / "cache").iterdir() if (p / "meta.json").is_file()]
    meta = json.loads((prepared / "meta.json").read_text())
    origins = datasets.Dataset.from_file(str(prepared / meta["shards"][0]))["origin"]
    assert len(origins) == len(logps) == 24
    for j in (0, 7, 23):
        line = int(origins[j].rsplit(":", 1)[1])
        rec = Record(origins[j], json.loads(lines[line - 1]))
        want = dense_reply_logps(model, tok, rec)
        np.testing.assert_allclose(logps[j], want, rtol=0, atol=2e-4)
    # A second run on the same data and reference reads the cache: no reference is loaded.
    r2 = dpo_recipe(tmp_path, tiny_dir, data, "run2")
    assert main(["train", str(r2)]) == 0
    assert "loading reference" not in capsys.readouterr().err
    assert [x["loss"] for x in rows_of(tmp_path / "run2", "loss")] == [x["loss"] for x in train]


def test_reference_path_and_orpo(tmp_path, tiny_dir, capsys):
    """reference: another model: the first step's rewards are the two models' difference, not 0;
    ORPO needs no reference and logs TRL's ORPO names."""
    data = pair_set(tmp_path / "pairs.jsonl")
    other = make_teacher(tiny_dir, tmp_path / "other", seed=3)
    r = dpo_recipe(tmp_path, tiny_dir, data, "ref", preference__reference=str(other))
    assert main(["train", str(r)]) == 0
    assert f"loading reference {other}" in capsys.readouterr().err
    first = rows_of(tmp_path / "ref", "loss")[0]
    assert abs(first["rewards/margins"]) > 1e-3
    o = dpo_recipe(tmp_path, tiny_dir, data, "orpo", objective="orpo")
    assert main(["train", str(o)]) == 0
    assert "loading reference" not in capsys.readouterr().err
    row = rows_of(tmp_path / "orpo", "loss")[0]
    for key in ("nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/margins"):
        assert key in row
    # ORPO's loss = NLL of the chosen replies - lambda * mean log sigmoid(log odds) (one
    # micro-batch per logged step, so the logged means obey it too).
    lam = 0.1
    assert abs(row["loss"] - (row["nll_loss"] - lam * row["log_odds_ratio"])) < 1e-4


def test_vision_pairs_train_with_the_reference_on_pixels(tmp_path, tiny_vision_dir, capsys):
    colour_set(tmp_path / "img", 8, seed=5)
    rows = []
    names = list(COLOURS)
    for line in (tmp_path / "img" / "colours_5.jsonl").read_text().splitlines():
        msgs = json.loads(line)["messages"]
        right = msgs[1]["content"]
        wrong = names[(names.index(right) + 1) % len(names)]
        image = msgs[0]["content"][0]["image"]
        prompt = [{"role": "user", "content": [{"type": "image"}, msgs[0]["content"][1]]}]
        rows.append({"prompt": prompt, "chosen": right, "rejected": wrong, "images": [image]})
    data = tmp_path / "img" / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = dpo_recipe(tmp_path, tiny_vision_dir, data, "vis", data__eval_split=0.0)
    assert main(["train", str(r)]) == 0
    first = rows_of(tmp_path / "vis", "loss")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-5  # the reference saw the same pixels


@pytest.mark.parametrize(
    "over, message",
    [
        (
            {"distill": {"teacher": "gguf:gemma3-270m"}},
            "objective: dpo trains on preference pairs, distill: on a teacher's distribution",
        ),
        ({"qat": {"format": "q4_0"}}, "qat cannot be combined with objective: dpo"),
        (
            {"preference__reference": "/nonexistent"},
            "preference.reference: /nonexistent is neither 'base'",
        ),
    ],
)
def test_refusals_are_one_line(tmp_path, tiny_dir, capsys, over, message):
    data = pair_set(tmp_path / "pairs.jsonl", n=8)
    r = dpo_recipe(tmp_path, tiny_dir, data, **over)
    assert main(["train", str(r)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_qlora_reference_is_the_nf4_base(tmp_path, tiny_dir):
    """With QLoRA the reference is loaded as the policy is (NF4): the first step is ln 2, so the
    policy's quantized base and the reference agree."""
    data = pair_set(tmp_path / "pairs.jsonl", n=12)
    r = dpo_recipe(tmp_path, tiny_dir, data, "q", method="qlora", training__max_steps=1)
    assert main(["train", str(r)]) == 0
    assert abs(rows_of(tmp_path / "q", "loss")[0]["loss"] - math.log(2)) < 1e-5
