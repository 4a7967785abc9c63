"""Distillation end to end on tiny models: the recipe section, the teacher cache (filled once,
keyed, resumed), cache = in the step, metrics, and one-line refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from trainutil import chat_set, write_recipe

from gemma3_tune.cli import main
from gemma3_tune.data import teacher_cache
from gemma3_tune.model.checkpoint import load_model, save_model


def make_teacher(src, dest, seed: int):
    """The tiny model with perturbed weights, as an HF folder with the same tokenizer."""
    model = load_model(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.data += torch.randn(p.shape, generator=g) * 0.05
    save_model(model, dest)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special")):
            shutil.copy(f, dest / f.name)
    return dest


def metrics(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "kd_loss" in r]


def distill_recipe(tmp_path, tiny_dir, teacher, name="run", **over):
    data = chat_set(tmp_path / "chat.jsonl", n=24)
    over = {
        "distill": {"teacher": str(teacher), "samples": 16},
        "data__cache_dir": str(tmp_path / "cache"),
        "training__max_steps": 6,
        "training__save_steps": 100,
        **over,
    }
    return write_recipe(tmp_path / f"{name}.yaml", tiny_dir, data, tmp_path / name, **over)


@pytest.fixture(scope="module")
def teacher_dir(tiny_dir, tmp_path_factory):
    return make_teacher(tiny_dir, tmp_path_factory.mktemp("teacher") / "model", seed=1)


def test_trains_logs_and_reuses_the_cache(tmp_path, tiny_dir, teacher_dir, capsys):
    """kd_loss and ce_loss per logged step, loss = alpha kd + (1 - alpha) ce; the second run
    reads the cache and never loads the teacher."""
    r = distill_recipe(tmp_path, tiny_dir, teacher_dir, distill__alpha=0.5)
    assert main(["train", str(r)]) == 0
    err = capsys.readouterr().err
    assert "loading teacher" in err and "bytes per token" in err
    rows = metrics(tmp_path / "run")
    assert len(rows) == 6
    for row in rows:
        assert abs(row["loss"] - (0.5 * row["kd_loss"] + 0.5 * row["ce_loss"])) < 1e-3
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"distillation from `{teacher_dir}`: 16 sampled teacher ids per token" in card
    assert "| distillation | kd_loss" in card
    caches = list((tmp_path / "cache" / "teacher").iterdir())
    assert len(caches) == 1 and (caches[0] / "COMPLETE").is_file()
    r2 = distill_recipe(tmp_path, tiny_dir, teacher_dir, "run2", distill__alpha=0.5)
    assert main(["train", str(r2)]) == 0
    assert "loading teacher" not in capsys.readouterr().err
    assert [x["kd_loss"] for x in metrics(tmp_path / "run2")] == [x["kd_loss"] for x in rows]


def test_cache_equals_in_step(tmp_path, tiny_dir, teacher_dir):
    """The same targets either way (each row draws from its own seeded generator): the losses
    of every step agree."""
    cached = distill_recipe(tmp_path, tiny_dir, teacher_dir, "cached")
    live = distill_recipe(tmp_path, tiny_dir, teacher_dir, "live", distill__cache=False)
    assert main(["train", str(cached)]) == 0
    assert main(["train", str(live)]) == 0
    a, b = metrics(tmp_path / "cached"), metrics(tmp_path / "live")
    assert len(a) == len(b) == 6
    for x, y in zip(a, b, strict=True):
        assert abs(x["kd_loss"] - y["kd_loss"]) <= 1e-5 * max(1.0, abs(x["kd_loss"]))
    assert (
        not (tmp_path / "cache" / "teacher").exists()
        or len(list((tmp_path / "cache" / "teacher").iterdir())) == 1
    )  # only the cached run wrote one


def test_student_learns_the_teacher(tmp_path, tiny_dir, teacher_dir):
    """kd_loss falls over 20 steps (the student moves towards the teacher's distribution). It
    is a cross-entropy, so its floor is the teacher's entropy (near ln 512 = 6.2 nats for a
    random tiny teacher): a fall of 0.1 nats is most of the way there (measured: 0.2)."""
    r = distill_recipe(tmp_path, tiny_dir, teacher_dir, training__max_steps=20)
    assert main(["train", str(r)]) == 0
    kd = [x["kd_loss"] for x in metrics(tmp_path / "run")]
    assert sum(kd[-3:]) / 3 < sum(kd[:3]) / 3 - 0.1, kd


def test_key_changes_with_teacher_and_settings(tmp_path, tiny_dir, teacher_dir):
    """Another teacher, another samples or mode: another cache folder, never a reused one."""
    other = make_teacher(tiny_dir, tmp_path / "other", seed=2)
    for i, (teacher, over) in enumerate(
        [
            (teacher_dir, {}),
            (other, {}),
            (teacher_dir, {"distill__samples": 8}),
            (teacher_dir, {"distill__mode": "topk"}),
        ]
    ):
        over = {"training__max_steps": 1, **over}
        r = distill_recipe(tmp_path, tiny_dir, teacher, f"r{i}", **over)
        assert main(["train", str(r)]) == 0
        assert len(list((tmp_path / "cache" / "teacher").iterdir())) == i + 1


def test_interrupted_fill_resumes(tmp_path, monkeypatch):
    """A fill stopped after its first shards resumes at the first missing one and ends equal
    to a fill made in one go."""
    monkeypatch.setattr(teacher_cache, "ROWS_PER_SHARD", 2)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(7):
        counts = rng.integers(1, 5, size=rng.integers(1, 6))
        e = int(counts.sum())
        rows.append((rng.integers(0, 500, e), rng.random(e).astype(np.float32), counts))
    asked: list[int] = []

    def targets(indices, stop_at=None):
        for i in indices:
            if i == stop_at:
                raise KeyboardInterrupt
            asked.append(i)
            yield rows[i]

    with pytest.raises(KeyboardInterrupt):
        teacher_cache.fill(tmp_path / "a", 7, lambda ix: targets(ix, stop_at=5), {})
    assert not (tmp_path / "a" / "COMPLETE").exists()
    asked.clear()
    cache = teacher_cache.fill(tmp_path / "a", 7, targets, {})
    assert asked == [4, 5, 6]  # shards [0, 1] and [2, 3] were whole
    whole = teacher_cache.fill(tmp_path / "b", 7, targets, {})
    for i, (ids, w, c) in enumerate(rows):
        for got in (cache.targets(i), whole.targets(i)):
            assert np.array_equal(got[0], ids) and np.array_equal(got[1], w)
            assert np.array_equal(got[2], c)


def test_bad_teachers_and_samples_are_one_line(tmp_path, tiny_dir, teacher_dir, capsys):
    def refused(**over) -> str:
        r = distill_recipe(tmp_path, tiny_dir, teacher_dir, **over)
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        assert main(["train", str(r)]) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        return err

    assert "distill.teacher" in refused(distill__teacher=str(tmp_path / "nope"))
    bigger = tmp_path / "bigger"
    shutil.copytree(teacher_dir, bigger)
    cfg = json.loads((bigger / "config.json").read_text())
    cfg["vocab_size"] = cfg["vocab_size"] * 2
    (bigger / "config.json").write_text(json.dumps(cfg))
    assert "vocabulary" in refused(distill__teacher=str(bigger))
    assert "distill.samples" in refused(distill__samples=0)
    assert "distill.samples" in refused(distill__samples=10**6)


def test_prompt_only_data_is_answered_by_the_teacher(tmp_path, tiny_dir, teacher_dir, capsys):
    """Requests alone: the teacher answers them (cached), the rows train on its replies, and a
    second run neither generates nor loads the teacher."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"number {k}"}]}) + "\n"
            for k in range(10)
        )
    )
    over = {"data__train": str(prompts), "distill__generate": {"max_new_tokens": 8}}
    r = distill_recipe(tmp_path, tiny_dir, teacher_dir, **over)
    assert main(["data", "check", str(r)]) == 0
    assert "10 await the teacher's answer" in capsys.readouterr().out
    assert main(["train", str(r)]) == 0
    assert "teacher answered 10 prompts" in capsys.readouterr().err
    assert main(["data", "check", str(r)]) == 0
    out = capsys.readouterr().out
    assert "has answered 10" in out and "samples            10" in out
    stores = list((tmp_path / "cache" / "answers").iterdir())
    lines = (stores[0] / "answers.jsonl").read_text().splitlines()
    assert len(stores) == 1 and len(lines) == 10
    assert len(metrics(tmp_path / "run")) == 6
    r2 = distill_recipe(tmp_path, tiny_dir, teacher_dir, "run2", **over)
    assert main(["train", str(r2)]) == 0
    err = capsys.readouterr().err
    assert "teacher answered" not in err and "loading teacher" not in err


def test_teacher_with_another_tokenizer_is_refused(tmp_path, tiny_dir, teacher_dir, capsys):
    """Same vocabulary size, other ids: the teacher's tokenizer.json with the ids of 'e' and
    'o' swapped (the same file unswapped is accepted, so the check compares ids, not files)."""
    same = tmp_path / "json-only"
    shutil.copytree(teacher_dir, same)
    (same / "tokenizer.model").unlink(missing_ok=True)
    r = distill_recipe(tmp_path, tiny_dir, same, "ok", training__max_steps=1)
    assert main(["train", str(r)]) == 0
    swapped = tmp_path / "swapped"
    shutil.copytree(same, swapped)
    tj = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["e"], vocab["o"] = vocab["o"], vocab["e"]
    (swapped / "tokenizer.json").write_text(json.dumps(tj))
    capsys.readouterr()
    r = distill_recipe(tmp_path, tiny_dir, swapped, "bad")
    assert main(["train", str(r)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizes text differently" in err, err


def test_vision_distillation_cache_equals_in_step(tmp_path, tiny_vision_dir):
    """Images: the teacher sees the pixels (its own tower) in the fill and in the step alike."""
    from trainutil import colour_set

    teacher = make_teacher(tiny_vision_dir, tmp_path / "vteacher", seed=3)
    data = colour_set(tmp_path / "img", 8, seed=1)
    runs = {}
    for name, cache in (("vcached", True), ("vlive", False)):
        over = {
            "distill": {"teacher": str(teacher), "samples": 16, "cache": cache},
            "data__cache_dir": str(tmp_path / "cache"),
            "training__max_steps": 3,
            "training__save_steps": 100,
        }
        r = write_recipe(tmp_path / f"{name}.yaml", tiny_vision_dir, data, tmp_path / name, **over)
        assert main(["train", str(r)]) == 0
        runs[name] = [x["kd_loss"] for x in metrics(tmp_path / name)]
    assert len(runs["vcached"]) == 3
    for a, b in zip(runs["vcached"], runs["vlive"], strict=True):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a))
