"""Sources, packing, truncation, collation."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from golden import check
from golden import rows as golden_rows
from PIL import Image

from gemma3_tune.data import prepare, sample_table
from gemma3_tune.data.collate import Collator, concat_row
from gemma3_tune.data.dataset import truncate
from gemma3_tune.data.packing import efficiency, pack
from gemma3_tune.data.settings import DataConfig
from gemma3_tune.data.template import IGNORE, Sample
from gemma3_tune.data.tokenizer import Tokenizer
from gemma3_tune.model.checkpoint import read_config


def _chat(i: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"question {i}"},
            {"role": "assistant", "content": "answer " * (i % 7 + 1)},
        ]
    }


@pytest.fixture(autouse=True)
def _small_parts(monkeypatch):
    """Cut JSONL files into ~300-byte parts so even these small files go through several
    worker processes."""
    monkeypatch.setattr(sample_table, "CHUNK_BYTES", 300)


def build(dc: DataConfig, tok, cfg, base, golden: str, seed: int = 0):
    """The parallel, cached `prepare`, its rows, report and example held to the golden ones
    (tests/golden.py: recorded from the in-memory pipeline when both gave the same)."""
    dc = dc.model_copy(update={"num_proc": 2})
    got = prepare.prepare(dc, tok.folder, cfg, base, seed)
    check(f"test_data:{golden}", golden_rows(got, base))
    return got


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("capacity", [1024, 4096])
def test_packing_lognormal_efficiency_and_integrity(capacity):
    rng = np.random.default_rng(0)
    lengths = (
        np.clip(rng.lognormal(mean=np.log(capacity / 6), sigma=0.9, size=3000), 16, capacity)
        .astype(int)
        .tolist()
    )
    rows = pack(lengths, capacity, seed=1)
    flat = [i for r in rows for i in r]
    assert sorted(flat) == list(range(len(lengths)))  # every sample exactly once
    assert all(
        sum(lengths[i] for i in r) <= capacity for r in rows
    )  # nothing crosses a row boundary
    assert efficiency(lengths, rows, capacity) >= 0.97
    assert pack(lengths, capacity, seed=1) == rows  # deterministic for a seed
    assert pack(lengths, capacity, seed=2) != rows


def test_collated_rows_keep_every_label_and_restart_positions():
    rng = random.Random(0)
    samples = []
    for k in range(40):
        n = rng.randint(3, 60)
        ids = [rng.randint(5, 400) for _ in range(n)]
        labels = [IGNORE if rng.random() < 0.4 else t for t in ids]
        labels[0] = IGNORE
        samples.append(Sample(ids, labels, origin=f"s{k}"))
    rows = pack([len(s) for s in samples], 128, seed=0)
    batch = Collator(pad_id=0)([concat_row([samples[i] for i in r]) for r in rows])
    assert (batch["labels"] != IGNORE).sum().item() == sum(
        s.trainable for s in samples
    )  # totals preserved
    assert batch["input_ids"].shape == (
        len(rows),
        max(sum(len(samples[i]) for i in r) for r in rows),
    )
    for b, r in enumerate(rows):
        expected_pos = [p for i in r for p in range(len(samples[i]))]
        assert batch["position_ids"][b, : len(expected_pos)].tolist() == expected_pos


def test_padded_batch_loss_equals_samples_alone(tiny_dir):
    from gemma3_tune.model import load_model

    model = load_model(tiny_dir).eval()
    a = Sample(list(range(5, 25)), [IGNORE] * 5 + list(range(10, 25)))
    b = Sample(list(range(30, 38)), [IGNORE] * 3 + list(range(33, 38)))
    batch = Collator(pad_id=0)([concat_row([a]), concat_row([b])])
    with torch.no_grad():
        both = model(**batch).loss.item()
        la = model(torch.tensor([a.input_ids]), labels=torch.tensor([a.labels])).loss.item()
        lb = model(torch.tensor([b.input_ids]), labels=torch.tensor([b.labels])).loss.item()
    # mean over predicted labels: a has 15 (incl. shift), b has 5
    assert abs(both - (la * 15 + lb * 5) / 20) <= 1e-5


def test_sources_json_parquet_disk_mixing_and_eval_split(tmp_path, tiny_dir):
    import datasets

    tok, cfg = Tokenizer(tiny_dir), read_config(tiny_dir)
    _write_jsonl(tmp_path / "a.jsonl", [_chat(i) for i in range(30)])
    (tmp_path / "b.json").write_text(json.dumps([_chat(i) for i in range(10)]))
    sharegpt = [
        {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
        for i in range(8)
    ]
    datasets.Dataset.from_list(
        [{"messages": json.dumps(None), **s} for s in sharegpt]
    ).remove_columns("messages").to_parquet(tmp_path / "c.parquet")
    datasets.Dataset.from_list([_chat(i) for i in range(6)]).save_to_disk(tmp_path / "d")
    dc = DataConfig(
        train=[
            {"path": "a.jsonl", "weight": 0.5},
            "b.json",
            {"path": "c.parquet", "samples": 12},
            "d",
        ],
        eval_split=0.1,
        max_seq_len=64,
    )
    data = build(dc, tok, cfg, tmp_path, "mixing", seed=3)
    total = 15 + 10 + 12 + 6
    assert data.report.samples + data.report.eval_samples == total
    assert data.report.eval_samples == round(total * 0.1)
    again = build(dc, tok, cfg, tmp_path, "mixing", seed=3)
    assert [s.origin for r in again.train_rows for s in r] == [
        s.origin for r in data.train_rows for s in r
    ]


def test_truncation_never_splits_an_image(tmp_path, tiny_vision_dir):
    tok, cfg = Tokenizer(tiny_vision_dir), read_config(tiny_vision_dir)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    row = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image", "image": "x.png"}, {"type": "text", "text": "and"}, {"type": "image", "image": "x.png"}]},
        {"role": "assistant", "content": "two black squares " * 3},
    ]}  # fmt: skip
    _write_jsonl(tmp_path / "t.jsonl", [row])
    full = build(
        DataConfig(train=["t.jsonl"], max_seq_len=4096), tok, cfg, tmp_path, "two-images"
    ).train_rows[0][0]
    boi = [i for i, t in enumerate(full.input_ids) if t == cfg.boi_token_id]
    eoi = [i for i, t in enumerate(full.input_ids) if t == cfg.eoi_token_id]
    for cut in range(boi[0] - 2, len(full)):
        s = truncate(full, cut, _vis(cfg))
        n_img = s.input_ids.count(cfg.image_token_id)
        assert n_img % cfg.mm_tokens_per_image == 0  # whole blocks only
        assert (
            n_img // cfg.mm_tokens_per_image == len(s.images) == s.input_ids.count(cfg.eoi_token_id)
        )
        assert len(s) <= cut
        if boi[1] < cut <= eoi[1]:  # a cut inside image 2 moves before it
            assert len(s) == boi[1]


def _vis(cfg):
    from gemma3_tune.data.dataset import vision_tokens

    return vision_tokens(cfg)


def test_long_samples_are_counted_truncated_or_dropped(tmp_path, tiny_dir):
    tok, cfg = Tokenizer(tiny_dir), read_config(tiny_dir)
    long = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "word " * 200},
        ]
    }
    _write_jsonl(tmp_path / "l.jsonl", [_chat(1), long, _chat(2)])
    t = build(DataConfig(train=["l.jsonl"], max_seq_len=64), tok, cfg, tmp_path, "truncated")
    assert (t.report.samples, t.report.truncated, t.report.dropped) == (3, 1, 0)
    assert "l.jsonl:2" in t.report.truncated_at[0]
    dc = DataConfig(train=["l.jsonl"], max_seq_len=64, truncation="drop")
    d = build(dc, tok, cfg, tmp_path, "dropped")
    assert (d.report.samples, d.report.truncated, d.report.dropped) == (2, 0, 1)
    assert "l.jsonl:2" in d.report.dropped_at[0]
    assert all(len(s) <= 64 for r in t.train_rows for s in r)


def test_sample_whose_images_alone_do_not_fit_is_dropped_with_its_line(tmp_path, tiny_vision_dir):
    """Two images need 2 x (16 soft tokens + boi + eoi) = 36 tokens: at max_seq_len 30 no cut
    can keep them whole, so the sample is dropped and reported, never cut inside an image."""
    tok, cfg = Tokenizer(tiny_vision_dir), read_config(tiny_vision_dir)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "x.png")
    two = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "image", "image": "x.png"}]},
        {"role": "assistant", "content": "two"},
    ]}  # fmt: skip
    _write_jsonl(tmp_path / "v.jsonl", [_chat(1), two, _chat(2)])
    data = build(DataConfig(train=["v.jsonl"], max_seq_len=30), tok, cfg, tmp_path, "images-alone")
    assert (data.report.samples, data.report.dropped, data.report.truncated) == (2, 1, 0)
    assert (
        "v.jsonl:2: its images alone take 36 tokens > max_seq_len 30" in data.report.dropped_at[0]
    )
    assert all(not s.images for r in data.train_rows for s in r)


def test_a_cut_image_block_is_refused_before_the_forward_pass(tiny_vision_dir):
    from gemma3_tune.errors import UserError
    from gemma3_tune.model import load_model

    model = load_model(tiny_vision_dir)
    n = model.config.mm_tokens_per_image
    ids = torch.full((1, 2 * n + 8), 5)
    ids[0, 2 : 2 + n] = model.config.image_token_id  # a whole image
    ids[0, n + 4 : 2 * n + 2] = model.config.image_token_id  # a block two tokens short
    features = torch.zeros(2, n, model.config.vision.hidden_size)
    with pytest.raises(UserError, match=f"has {n - 2} image tokens.*exactly {n}"):
        model(ids, vision_features=features)
