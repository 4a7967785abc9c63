"""QAT the report's way (train/qat.py, objectives/distill.py, train/qat_data.py): the default
`target: teacher` distils the starting checkpoint on every position of the training rows, not
only the labelled replies; `qat.data: [self]` trains on text the checkpoint samples itself,
once, cached, the same for the same seed."""

from __future__ import annotations

import json

import pytest
from trainutil import chat_set, write_recipe

from gemma3_tune.cli import main
from gemma3_tune.data.collate import every_position
from gemma3_tune.data.template import IGNORE
from gemma3_tune.train.recipe import load_recipe


def test_every_position_targets_all_but_document_starts_padding_and_images():
    """Hand-built row: two documents (positions restart), an image block, and padding."""
    pad, img = 0, 99
    features = {
        "input_ids": [2, 10, 11, 12, 2, 20, img, img, 21, pad, pad],
        "position_ids": [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1],
    }
    want = [IGNORE, 10, 11, 12, IGNORE, 20, IGNORE, IGNORE, 21, IGNORE, IGNORE]
    assert every_position(features, frozenset({pad, img})) == want


def _trainer(tmp_path, tiny_dir, method: str, **over):
    from gemma3_tune.train.trainer import build_trainer

    data = chat_set(tmp_path / "chat.jsonl", n=12)
    over = {
        "method": method,
        "qat": {"format": "q4_0"},  # target: teacher is the default
        "data__cache_dir": str(tmp_path / "cache"),
        "data__eval_split": 0.25,
        "training__max_steps": 1,
        **over,
    }
    r = write_recipe(tmp_path / f"{method}.yaml", tiny_dir, data, tmp_path / method, **over)
    trainer, _, _ = build_trainer(load_recipe(r))
    return trainer


def _targets(row: dict) -> int:
    """Independently of every_position: a packed text row's tokens minus one per document
    (the documents' first tokens: each row of these chats is whole documents, no padding)."""
    return len(row["input_ids"]) - row["position_ids"].count(0)


@pytest.mark.parametrize(
    "method,distribution",
    [("lora", "full"), ("full", "full"), ("lora", "sampled"), ("full", "sampled")],
)
def test_default_teacher_targets_every_position(tmp_path, tiny_dir, method, distribution):
    """LoRA (the teacher runs in the step) and full (a second model in the step, or its sampled
    targets cached before the student loads): every training position gets the teacher's
    targets, prompts included; the evaluation rows keep their labels (the task's score)."""
    qat = {"format": "q4_0", "distribution": distribution}
    trainer = _trainer(tmp_path, tiny_dir, method, qat=qat)
    objective = trainer.objective
    assert objective.every
    batch = next(iter(trainer.get_train_dataloader()))
    rows = [trainer.train_dataset[int(i)] for i in batch["row_ids"]]
    want = [_targets(r) for r in rows]
    scored = (batch["labels"][:, 1:] != IGNORE).sum(1).tolist()
    assert scored == want
    prompt_scored = sum(sum(x != IGNORE for x in r["labels"]) for r in rows)
    assert prompt_scored == sum(want)  # the rows' own labels, rewritten: every position
    inputs = {k: v for k, v in batch.items()}
    targets = objective.distiller.soft_targets(inputs, batch["row_ids"])
    if distribution == "full":
        assert targets.hidden.shape[0] == sum(want)  # the teacher's state at each position
    else:
        assert int(targets.token.max()) + 1 == sum(want)
    assert targets.alpha == 1.0  # pure distillation
    ev = trainer.eval_dataset[0]
    assert sum(x != IGNORE for x in ev["labels"]) < _targets(ev)  # replies only


def test_full_distribution_loss_is_the_checkpoints_softmax_on_every_position(tmp_path, tiny_dir):
    """The default (LoRA, distribution full) at step 1, where the student is fq(W): the step's
    loss equals torch's cross-entropy from the unquantized model's softmax to the quantized
    model's, on dense logits of every position of the batch (fp32, <= 1e-5)."""
    import torch
    import torch.nn.functional as F

    from gemma3_tune.train.qat import disabled

    trainer = _trainer(tmp_path, tiny_dir, "lora")
    model, objective = trainer.model, trainer.objective
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    with torch.no_grad():
        student = model(**inputs).logits[:, :-1]  # [B, T-1, V]: fq(W), B = 0
        with model.disable_adapter(), disabled(model):
            teacher = model(**inputs).logits[:, :-1]
    keep = batch["labels"][:, 1:] != IGNORE
    want = F.cross_entropy(student[keep], teacher[keep].softmax(-1))
    soft = objective.distiller.soft_targets(dict(batch), batch["row_ids"])
    got = model(**inputs, labels=batch["labels"], soft_targets=soft).loss
    assert abs(got.item() - want.item()) <= 1e-5 * want.item()
    assert want.item() > 1e-4  # q4_0 moved the distribution: a loss that could come out wrong


def test_labels_target_keeps_the_replies(tmp_path, tiny_dir):
    trainer = _trainer(tmp_path, tiny_dir, "lora", qat={"format": "q4_0", "target": "labels"})
    batch = next(iter(trainer.get_train_dataloader()))
    rows = [trainer.train_dataset[int(i)] for i in batch["row_ids"]]
    assert (batch["labels"][:, 1:] != IGNORE).sum() < sum(_targets(r) for r in rows)


def _self_recipe(tmp_path, tiny_dir, name: str, seed: int = 0, data=("self",)):
    chats = chat_set(tmp_path / "chat.jsonl", n=8)
    over = {
        "qat": {
            "format": "q4_0",
            "data": list(data),
            "generate": {"samples": 6, "max_new_tokens": 12},
        },
        "data__cache_dir": str(tmp_path / name),
        "training__seed": seed,
        "training__max_steps": 2,
        "training__save_steps": 100,
    }
    return write_recipe(
        tmp_path / f"{name}.yaml", tiny_dir, chats, tmp_path / f"run-{name}", **over
    )


def test_self_text_is_sampled_once_cached_and_reproducible(tmp_path, tiny_dir, capsys):
    """`data check` loads no model: it says the texts await; the first resolve samples them,
    the second reads the cache (file untouched); another cache with the same seed writes the
    same texts, another seed others."""
    from gemma3_tune.train.qat_data import resolve

    first = _self_recipe(tmp_path, tiny_dir, "a")
    assert main(["data", "check", str(first)]) == 0
    assert "await sampling" in capsys.readouterr().out
    recipe = resolve(load_recipe(first))
    (src,) = recipe.data.train
    path = type(tmp_path)(src.path)
    texts = [json.loads(x)["text"] for x in path.read_text().splitlines()]
    assert len(texts) == 6 and len(set(texts)) == 6
    stamp = path.stat().st_mtime_ns
    assert resolve(load_recipe(first)).data.train[0].path == src.path
    assert path.stat().st_mtime_ns == stamp
    again = resolve(load_recipe(_self_recipe(tmp_path, tiny_dir, "b")))
    assert type(tmp_path)(again.data.train[0].path).read_text() == path.read_text()
    other = resolve(load_recipe(_self_recipe(tmp_path, tiny_dir, "c", seed=1)))
    assert type(tmp_path)(other.data.train[0].path).read_text() != path.read_text()


def test_train_and_self_mix_and_train(tmp_path, tiny_dir):
    """`[train, self]`: the run's chats and the checkpoint's texts, both in the report."""
    r = _self_recipe(tmp_path, tiny_dir, "mix", data=("train", "self"))
    assert main(["train", str(r)]) == 0
    report = json.loads((tmp_path / "run-mix" / "data_report.json").read_text())
    assert report["text_documents"] == 6
    kinds = json.dumps(report)
    assert "chat.jsonl" in kinds and "self_text.jsonl" in kinds


@pytest.mark.parametrize(
    "qat,words",
    [
        ({"format": "q4_0", "data": [{"path": "train", "weight": 2}]}, "data.train"),
        ({"format": "q4_0", "data": ["train"]}, "data.train"),
    ],
)
def test_bad_qat_data_is_one_line(tmp_path, tiny_dir, capsys, qat, words):
    r = tmp_path / "r.yaml"
    r.write_text(json.dumps({"model": {"path": str(tiny_dir)}, "data": {}, "qat": qat}))
    assert main(["train", str(r)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
