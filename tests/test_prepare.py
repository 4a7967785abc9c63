"""The prepared-data cache: hit and miss for every input, one preparation per node, a killed
preparation never trusted, and bad samples reported alike from every worker process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from trainutil import free_port

from gemma3_tune.data import prepare, sample_table
from gemma3_tune.data.dataset import DataErrors
from gemma3_tune.data.settings import DataConfig
from gemma3_tune.model.checkpoint import read_config


def _chats(path: Path, n: int, start: int = 0) -> Path:
    with open(path, "w") as f:
        for i in range(start, start + n):
            msgs = [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": "answer " * (i % 9 + 1)},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


@pytest.fixture
def setup(tmp_path, tiny_dir, monkeypatch):
    """A copy of the tiny model folder (its tokenizer files get edited), a 40-line chat file,
    and a function preparing it with settings overridden."""
    monkeypatch.setattr(sample_table, "CHUNK_BYTES", 400)
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    data = _chats(tmp_path / "chats.jsonl", 40)
    cfg = read_config(model)

    def run(seed: int = 0, **over):
        settings = {"max_seq_len": 48, "cache_dir": str(tmp_path / "cache"), **over}
        dc = DataConfig(train=[str(data)], **settings)
        return prepare.prepare(dc, model, cfg, tmp_path, seed)

    return run, data, model


def test_cache_hit_and_miss_for_every_input(setup, monkeypatch):
    run, data, model = setup
    assert run().built
    first = run()
    assert not first.built and first.report.samples == 40
    # settings that do not change the rows reuse the cache
    assert not run(max_errors=3).built and not run(num_proc=1).built
    # every input that changes the rows rebuilds
    for change in (
        {"max_seq_len": 64},
        {"truncation": "drop"},
        {"train_on": "all"},
        {"packing": False},
        {"eval_split": 0.1},
        {"seed": 7},
    ):
        assert run(**change).built, change
        assert not run(**change).built, change
    monkeypatch.setattr(prepare, "TEMPLATE_VERSION", prepare.TEMPLATE_VERSION + 1)
    assert run().built  # the template changed
    monkeypatch.undo()
    monkeypatch.setattr(sample_table, "CHUNK_BYTES", 400)
    cfg_file = model / "tokenizer_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "note": "edited"}))
    assert run().built  # a tokenizer file changed
    text = data.read_text()
    data.write_text(text.replace("question 7", "question 8"))  # same size, new content
    assert run().built
    _chats(data, 41)
    rebuilt = run()
    assert rebuilt.built and rebuilt.report.samples == 41


def test_huge_files_are_fingerprinted_by_samples(setup, monkeypatch):
    """Above FULL_HASH_BYTES a file is keyed by size, mtime and sampled blocks: a changed
    block or a touched file rebuilds."""
    run, data, _ = setup
    monkeypatch.setattr(prepare, "FULL_HASH_BYTES", 100)
    assert "sampled_sha256" in prepare._file_fingerprint(data)
    assert run().built and not run().built
    os.utime(data, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert run().built


def test_bad_samples_are_reported_alike_from_every_worker(tmp_path, tiny_dir, monkeypatch):
    """Bad lines in several parts, prepared by 2 processes: the same one-line errors, in file
    order, as reading the file in one process (golden: recorded from the in-memory pipeline)."""
    monkeypatch.setattr(sample_table, "CHUNK_BYTES", 200)
    lines = _chats(tmp_path / "c.jsonl", 30).read_text().splitlines()
    lines[3] = "{broken"
    lines[17] = json.dumps({"messages": [{"role": "assistant", "content": "no question"}]})
    lines[25] = json.dumps({"messages": [{"role": "pirate", "content": "arr"}]})
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    dc = DataConfig(train=["c.jsonl"], num_proc=2, cache_dir=str(tmp_path / "cache"))
    cfg = read_config(tiny_dir)
    want = [
        "c.jsonl:4: broken JSON (Expecting property name enclosed in double quotes at column 2):"
        " {broken",
        "c.jsonl:18: turn 0 is 'assistant', expected 'user': roles must alternate user/assistant",
        "c.jsonl:26: message 0: unknown role 'pirate'; use system, user, assistant or tool",
    ]
    assert len(sample_table.parts(tmp_path / "c.jsonl", 0)) > 4
    with pytest.raises(DataErrors) as got:
        prepare.prepare(dc, tiny_dir, cfg, tmp_path, 0)
    assert [str(e) for e in got.value.errors] == [f"{tmp_path}/{e}" for e in want]
    assert [e.origin.rsplit(":", 1)[1] for e in got.value.errors] == ["4", "18", "26"]
    assert not list((tmp_path / "cache").iterdir())  # nothing cached


def _recipe(tmp_path: Path, model: Path, data: Path, cache: Path) -> Path:
    r = {
        "model": {"path": str(model)},
        "data": {"train": str(data), "max_seq_len": 64, "cache_dir": str(cache)},
    }
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


@pytest.mark.slow
def test_two_processes_prepare_once_and_map_the_same_rows(tmp_path, tiny_dir):
    recipe = _recipe(tmp_path, tiny_dir, _chats(tmp_path / "c.jsonl", 300), tmp_path / "cache")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "gemma3_tune", "data", "prepare", str(recipe),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [x for x in done.stdout.splitlines() if x.startswith("data: ")]
    assert len(lines) == 2, done.stdout
    assert sum("(prepared now;" in x for x in lines) == 1  # one preparation
    assert sum("(already prepared;" in x for x in lines) == 1  # the other rank mapped it
    digests = {x.rsplit("rows digest ", 1)[1] for x in lines}
    assert len(digests) == 1  # identical rows on both ranks
    assert len([p for p in (tmp_path / "cache").iterdir()]) == 1


@pytest.mark.slow
def test_killed_preparation_leaves_no_trusted_cache(tmp_path, tiny_dir):
    cache = tmp_path / "cache"
    recipe = _recipe(tmp_path, tiny_dir, _chats(tmp_path / "c.jsonl", 30000), cache)
    cmd = [sys.executable, "-m", "gemma3_tune", "data", "prepare", str(recipe)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(cache.glob(".*.tmp-*/samples*")):  # mid-way: shards being written
        assert proc.poll() is None and time.monotonic() < deadline, "preparation ended too soon"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name.startswith(".") for p in cache.iterdir()] == [True]  # only the partial one
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(prepared now;" in done.stdout  # rebuilt, not trusted
    names = [p.name for p in cache.iterdir()]
    assert len(names) == 1 and not names[0].startswith(".")  # the stale partial one is gone
    assert (cache / names[0] / prepare.COMPLETE).is_file()
