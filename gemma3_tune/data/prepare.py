"""Prepared data: the one pipeline from a recipe's `data:` section to training rows, tokenized
once, in parallel, into memory-mapped Arrow files, and reused.

sources -> validated turns -> template (ids + loss mask) -> mixing (weights / counts) -> eval
split -> truncation (never inside an image) -> packing -> rows; `train`, `data check` and the
objectives all read their rows from here.
- JSONL sources are cut into byte ranges at line starts and rendered by `num_proc` worker
  processes through `datasets.map`, which writes Arrow shards (sample_table.py: input_ids,
  labels, images, origin, length, status); nothing is held in Python lists but the per-sample
  lengths;
- mixing, the eval split, truncation counts and packing work on sample indices and lengths
  (the steps are dataset.py's); rows are stored as index arrays (prepared.py), never as copies
  of the tokens;
- the result is cached under a key made of everything that changes it (source contents or a
  sampled fingerprint of huge files, tokenizer files, template version, image tokens, every
  data setting, the seed), so a second `train` or `data check` maps the files in seconds;
- with `answers` (a distillation teacher's replies, `data/answers.py`), a conversation ending on
  the user's turn gets the teacher's reply appended before rendering, and the replies are part
  of the key (a hash of their text): another teacher, other rows;
- it is written into a temporary folder and renamed when complete, so a killed preparation
  never leaves a cache that a later run trusts;
- under torchrun or DeepSpeed only local rank 0 prepares; the other ranks of the node wait for
  the finished folder and map the same files. Two nodes sharing a filesystem may both prepare:
  the first rename wins, the second copy is discarded (same key, same content).

Nothing is dropped or cut silently: every truncated or dropped sample is counted, with its
file and line, in the report.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np

from ..outputs import wait_for_file
from .answers import AnswerStore, Prompt
from .dataset import Report, mix, row_fill, row_indices, split_eval, vision_tokens
from .prepared import Prepared, load, write
from .sample_table import DROPPED, OK, bad_samples, render_sources
from .settings import DataConfig, Source, data_root, resolve_path
from .template import VisionTokens
from .tokenizer import TOKENIZER_FILES

FORMAT_VERSION = 4  # bump when the files written here change
TEMPLATE_VERSION = 2  # bump when template.render or dataset.fit_one change their output
FULL_HASH_BYTES = 64 << 20  # files up to this size are hashed whole; larger ones sampled
COMPLETE = "COMPLETE"


# ---------------------------------------------------------------------------------------------
# The cache key


def _file_fingerprint(path: Path) -> dict:
    """Content hash of a file; above FULL_HASH_BYTES, size + mtime + 16 sampled MiB."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return {"sha256": h.hexdigest(), "size": st.st_size}
        block = min(1 << 20, st.st_size // 16)
        for k in range(16):  # 16 blocks spread evenly, the first at 0, the last at the end
            f.seek(k * (st.st_size - block) // 15)
            h.update(f.read(block))
    return {"sampled_sha256": h.hexdigest(), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def source_fingerprint(path: Path) -> object:
    if not path.exists():
        return None  # read_records reports it, with the data.train hint
    if path.is_dir():
        return {
            str(p.relative_to(path)): _file_fingerprint(p)
            for p in sorted(path.rglob("*"))
            if p.is_file()
        }
    return _file_fingerprint(path)


def cache_key(
    cfg: DataConfig,
    base: Path,
    tok_folder: Path,
    vision: VisionTokens | None,
    seed: int,
    answers: str | None = None,
    pairs: bool = False,
) -> tuple[str, dict]:
    """(hex key, the inputs it hashes). Every input that changes the prepared rows is in it;
    `answers` is the teacher replies' digest (AnswerStore.digest), absent without a teacher;
    `pairs` (preference data) only when set."""

    def sources(srcs: list[Source] | None) -> list[dict] | None:
        if srcs is None:
            return None
        return [
            {**s.model_dump(), "content": source_fingerprint(resolve_path(s.path, base))}
            for s in srcs
        ]

    settings = cfg.model_dump(
        exclude={"train", "eval", "max_errors", "num_proc", "cache_dir", "allow_drop"}
    )
    settings["feature_cache"] = None  # features are cached elsewhere; rows do not depend on it
    inputs = {
        "format": FORMAT_VERSION,
        "template": TEMPLATE_VERSION,
        "train": sources(cfg.train),
        "eval": sources(cfg.eval),
        "base": str(base.resolve()),  # relative image paths resolve from here
        "settings": settings,
        "tokenizer": {
            name: _file_fingerprint(tok_folder / name)
            for name in TOKENIZER_FILES
            if name.startswith(("tokenizer", "special")) and (tok_folder / name).is_file()
        },
        "vision": None if vision is None else vision.__dict__,
        "seed": seed,
    }
    if answers is not None:  # only then: the keys of data without a teacher stay as they were
        inputs["answers"] = answers
    if pairs:
        inputs["pairs"] = True
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24], inputs


# ---------------------------------------------------------------------------------------------
# Building a cache folder


def _build(
    folder: Path,
    cfg: DataConfig,
    tok_folder: Path,
    vision: VisionTokens | None,
    base: Path,
    seed: int,
    num_proc: int,
    answers: tuple[str, str] = ("", ""),
    pairs: bool = False,
) -> None:
    """Render, check, mix, split and pack into `folder`; `answers`: (store file, digest)."""
    sources = [*cfg.train, *(cfg.eval or [])]
    t0 = time.perf_counter()
    ds, procs = render_sources(
        folder, sources, cfg, tok_folder, vision, base, num_proc, answers, pairs
    )
    errors = bad_samples(ds, sources, cfg, base)
    if errors is not None:
        raise errors
    seconds = time.perf_counter() - t0
    if len(ds) >= 10_000:  # worth a line (small data sets keep error output to one line)
        print(
            f"prepared {len(ds):,} samples in {seconds:.1f} s ({len(ds) / max(seconds, 1e-9):,.0f}"
            f" samples/s, {procs} processes)",
            file=sys.stderr,
        )
    status = ds.data.column("status").to_numpy()
    train, evals = _mixed(ds, sources, cfg, seed)
    report = _noted(ds, status, train)
    train = [i for i in train if status[i] != DROPPED]
    evals = [i for i in evals if status[i] != DROPPED]
    lengths = ds.data.column("length").to_numpy()
    train_rows = _rows(train, lengths, cfg, seed)
    eval_rows = _rows(evals, lengths, cfg, seed) if cfg.packing else [[i] for i in evals]
    _count(report, ds, train, evals, train_rows, cfg)
    _per_source(report, ds, train, cfg.train)
    example = train[0] if train else -1  # the first sample training sees (never a dropped one)
    write(folder, ds, train_rows, eval_rows, lengths[train], example, report, seconds, procs)


def _mixed(ds, sources: list[Source], cfg: DataConfig, seed: int) -> tuple[list[int], list[int]]:
    """Sample indices of the train and eval sets: every source mixed by its weight or count,
    then, without eval sources, data.eval_split held out (a raw text document's windows on one
    side together)."""
    src = ds.data.column("src").to_numpy()
    n_train = len(cfg.train)
    train: list[int] = []
    evals: list[int] = []
    for i, s in enumerate(sources):
        mixed = mix(np.flatnonzero(src == i).tolist(), s, seed)
        (train if i < n_train else evals).extend(mixed)
    if not cfg.eval:
        window = ds.data.column("window").to_numpy()
        documents = None
        if cfg.eval_split and (window[train] > 0).any():
            origin = ds.data.column("origin").to_pylist()
            documents = [origin[i] if window[i] else i for i in train]
        train, evals = split_eval(train, cfg.eval_split, seed, documents)
    return train, evals


def _noted(ds, status: np.ndarray, train: list[int]) -> Report:
    """A report noting every truncated or dropped training sample, in train order."""
    report = Report()
    notes, lost = ds.data.column("note"), ds.data.column("lost").to_numpy()
    for i in np.flatnonzero(status[train] != OK).tolist():
        j = train[i]
        report.note(status[j] == DROPPED, notes[j].as_py(), int(lost[j]))
    return report


def _rows(indices: list[int], lengths: np.ndarray, cfg: DataConfig, seed: int) -> list[list[int]]:
    """Rows of these samples (packed, or one per row), as sample indices."""
    return [[indices[j] for j in row] for row in row_indices(lengths[indices].tolist(), cfg, seed)]


def _count(
    report: Report, ds, train: list[int], evals: list[int], train_rows: list, cfg: DataConfig
) -> None:
    """The report's totals over the training samples kept and their rows."""
    train_lengths = ds.data.column("length").to_numpy()[train]
    report.samples, report.eval_samples = len(train), len(evals)
    report.tokens = int(train_lengths.sum())
    report.trainable_tokens = int(ds.data.column("trainable").to_numpy()[train].sum())
    report.images = int(ds.data.column("n_images").to_numpy()[train].sum())
    report.rows = len(train_rows)
    longest = int(train_lengths.max()) if len(train_lengths) else 0
    report.packing_efficiency = row_fill(report.tokens, len(train_rows), longest, cfg)


def _per_source(report: Report, ds, train: list[int], sources: list[Source]) -> None:
    """What each train source contributes to what is trained (after mixing, the eval split and
    dropping): samples, tokens, trained tokens and its share of them; raw text documents and
    windows."""
    col = ds.data.column
    src, window = col("src").to_numpy()[train], col("window").to_numpy()[train]
    tokens, trained = col("length").to_numpy()[train], col("trainable").to_numpy()[train]
    origin = col("origin")  # a document's windows share its origin; mixing may keep a few
    report.text_documents = len({origin[int(i)].as_py() for i in np.asarray(train)[window > 0]})
    report.text_windows = int((window >= 1).sum())
    total = max(int(trained.sum()), 1)
    for i, s in enumerate(sources):
        mine = src == i
        report.sources.append({
            "path": s.path,
            "samples": int(mine.sum()),
            "tokens": int(tokens[mine].sum()),
            "trainable_tokens": int(trained[mine].sum()),
            "share": round(int(trained[mine].sum()) / total, 4),
        })  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Finding or making the folder


def _complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def _remove_stale(root: Path) -> None:
    """Temporary folders of preparations whose process is gone (killed) on this host."""
    host = socket.gethostname()
    for tmp in root.glob(".*.tmp-*"):
        try:
            tmp_host, pid = tmp.name.rsplit(".tmp-", 1)[1].rsplit("-", 1)
            if tmp_host == host and not Path(f"/proc/{int(pid)}").exists():
                shutil.rmtree(tmp, ignore_errors=True)
        except ValueError:
            continue


def prepare(
    cfg: DataConfig,
    tok_folder: Path,
    model_config,
    base: Path,
    seed: int,
    wait_seconds: float = 3 * 3600,
    answers: AnswerStore | None = None,
    prompts: list[Prompt] | None = None,
    pairs: bool = False,
) -> Prepared:
    """The prepared data for these settings: from the cache, or built (by local rank 0) and
    cached. Raises DataErrors listing bad samples.

    `answers`: a teacher's replies (filled by `answers.answer_prompts` first); conversations
    ending on the user's turn get theirs appended, a prompt without one is a bad sample.
    `prompts`: this data's prompts (`answers.find_prompts`): the key then hashes only their
    replies, so filling the store for other data leaves this cache valid.
    `pairs`: the data is preference pairs (objective dpo/orpo), each one sample of two
    documents (data/preference.py)."""
    vision = vision_tokens(model_config)
    root = data_root(cfg, base)
    keys = None if prompts is None else [p.key for p in prompts]
    digest = answers.digest(keys) if answers is not None else None
    key, inputs = cache_key(cfg, base, tok_folder, vision, seed, digest, pairs)
    folder = root / key
    if _complete(folder):
        return load(folder, built=False)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        wait_for_file(folder / COMPLETE, wait_seconds, f"local rank 0 to prepare {folder}")
        return load(folder, built=False)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    tmp = root / f".{key}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        num_proc = cfg.num_proc or os.cpu_count() or 1
        store = (str(answers.path), digest) if answers is not None else ("", "")
        _build(tmp, cfg, tok_folder, vision, base, seed, num_proc, store, pairs)
        (tmp / "inputs.json").write_text(json.dumps(inputs, indent=1, default=str))
        (tmp / COMPLETE).write_text("")
        try:
            os.rename(tmp, folder)
        except OSError:  # another node finished the same key first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load(folder, built=True)
