"""Prepared data: tokenize once, in parallel, into memory-mapped Arrow files, and reuse them.

`prepare()` turns a recipe's `data:` section into the same rows as `dataset.build()` (tested
equal), but:
- JSONL sources are cut into byte ranges at line starts and rendered by `num_proc` worker
  processes through `datasets.map`, which writes Arrow shards (input_ids, labels, images,
  origin, length, status); nothing is held in Python lists but the per-sample lengths;
- mixing, the eval split, truncation counts and packing work on sample indices and lengths;
  rows are stored as index arrays (`rows.npz`), never as copies of the tokens;
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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..outputs import wait_for_file
from ..progress import on_terminal
from .answers import AnswerStore, Prompt, answered
from .dataset import (
    DataConfig,
    DataErrors,
    Report,
    Source,
    _mix,
    fit_one,
    row_fill,
    row_indices,
    split_eval,
    vision_tokens,
)
from .preference import render_pair
from .settings import data_root, default_cache_dir, image_store, resolve_path, turn_options  # noqa: F401
from .sources import Record, SampleError, _read_jsonl, read_records, to_turns
from .template import IGNORE, ImageRef, Sample, VisionTokens, has_images, render
from .tokenizer import TOKENIZER_FILES, Tokenizer

FORMAT_VERSION = 3  # bump when the files written here change
TEMPLATE_VERSION = 2  # bump when template.render or dataset.fit_one change their output
CHUNK_BYTES = 4 << 20  # JSONL bytes per map task: small enough for a smooth progress bar
FULL_HASH_BYTES = 64 << 20  # files up to this size are hashed whole; larger ones sampled
COMPLETE = "COMPLETE"
OK, TRUNCATED, DROPPED, BAD = 0, 1, 2, 3  # the `status` column


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
# Rendering, in worker processes


def _chunks(path: Path, src: int) -> list[dict]:
    """Map tasks for one source: byte ranges starting at line starts for JSONL, else one."""
    task = {"src": src, "path": str(path), "start": 0, "end": -1, "line": 1}
    if path.suffix not in (".jsonl", ".ndjson") or not path.is_file():
        return [task]
    size = path.stat().st_size
    out, start, line = [], 0, 1
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(start + CHUNK_BYTES, size))
            if f.tell() < size:
                f.readline()  # to the next line start
            end = f.tell()
            out.append({**task, "start": start, "end": end, "line": line})
            f.seek(start)
            line += f.read(end - start).count(b"\n")
            start = end
    return out or [task]


_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(folder: str) -> Tokenizer:
    if folder not in _TOKENIZERS:  # once per worker process
        _TOKENIZERS[folder] = Tokenizer(folder)
    return _TOKENIZERS[folder]


def _records(task: dict):
    path = Path(task["path"])
    if task["end"] >= 0:
        return _read_jsonl(path, task["start"], task["end"], task["line"])
    return read_records(path)


_ANSWERS: dict[tuple[str, str], dict[str, str]] = {}


def _answers(path: str, digest: str) -> dict[str, str] | None:
    """The teacher's replies (prompt key -> text), read once per worker process and digest."""
    if not path:
        return None
    if (path, digest) not in _ANSWERS:
        _ANSWERS.clear()  # one store at a time
        _ANSWERS[(path, digest)] = AnswerStore(Path(path).parent).load()
    return _ANSWERS[(path, digest)]


def render_tasks(
    batch: dict,
    cfg_json: str,
    tok_folder: str,
    vision_json: str,
    base: str,
    answers_path: str = "",
    answers_digest: str = "",
    pairs: bool = False,
) -> dict:
    """datasets.map function: map tasks (file parts) in, one row per sample out. With
    `answers_path` (an AnswerStore's file), prompts get the teacher's reply appended; with
    `pairs`, every record is a preference pair (data/preference.py)."""
    cfg = DataConfig.model_validate_json(cfg_json)
    vision = None if vision_json == "null" else VisionTokens(**json.loads(vision_json))
    tok = _tokenizer(tok_folder)
    answers = _answers(answers_path, answers_digest)
    cols: dict[str, list] = {
        k: []
        for k in (
            "src",
            "origin",
            "status",
            "note",
            "length",
            "lost",
            "trainable",
            "n_images",
            "input_ids",
            "labels",
            "images",
            "split",
        )
    }

    def add(
        src: int, origin: str, status: int, note: str, sample: Sample | None, lost: int = 0
    ) -> None:
        cols["src"].append(src)
        cols["origin"].append(origin)
        cols["status"].append(status)
        cols["note"].append(note)
        cols["length"].append(len(sample) if sample else 0)
        cols["lost"].append(lost)
        cols["trainable"].append(sample.trainable if sample else 0)
        cols["n_images"].append(len(sample.images) if sample else 0)
        cols["input_ids"].append(sample.input_ids if sample else [])
        cols["labels"].append(sample.labels if sample else [])
        cols["images"].append(
            [{"path": im.path, "views": im.views} for im in sample.images] if sample else []
        )
        cols["split"].append(sample.split if sample else 0)

    for i in range(len(batch["src"])):
        task = {k: batch[k][i] for k in batch}
        path = Path(task["path"])
        options = turn_options(cfg, Path(base), path)
        try:
            for rec in _records(task):
                try:
                    if pairs:
                        sample = render_pair(rec, tok, vision, options)
                    else:
                        sample = _render_one(rec, cfg, tok, vision, options, answers)
                except SampleError as e:
                    add(task["src"], e.origin, BAD, e.reason, None)
                    continue
                kept, note = fit_one(sample, cfg, vision)
                status = OK if not note else DROPPED if kept is None else TRUNCATED
                lost = len(sample) - (len(kept) if kept else 0)
                add(task["src"], sample.origin, status, note, kept, lost)
        except SampleError as e:  # the whole source is unreadable
            add(task["src"], e.origin, BAD, e.reason, None)
    return cols


def _render_one(
    rec: Record, cfg, tok, vision, options: dict, answers: dict[str, str] | None
) -> Sample:
    """The same steps as dataset.load_samples, for one record; with `answers`, a conversation
    ending on the user's turn first gets the teacher's reply."""
    turns = to_turns(rec, allow_prompt_only=answers is not None, **options)
    if vision is None and has_images(turns):
        raise SampleError(
            rec.origin, "has an image, but the model is text-only (use a 4B+ Gemma 3)"
        )
    if answers is not None:
        turns = answered(turns, tok, vision, answers, rec.origin)
    sample = render(turns, tok, vision, cfg.train_on)
    sample.origin = rec.origin
    return sample


def _features():
    import datasets

    return datasets.Features(
        {
            "src": datasets.Value("int32"),
            "origin": datasets.Value("string"),
            "status": datasets.Value("int8"),
            "note": datasets.Value("string"),
            "length": datasets.Value("int32"),
            "lost": datasets.Value("int32"),
            "trainable": datasets.Value("int32"),
            "n_images": datasets.Value("int32"),
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "images": [{"path": datasets.Value("string"), "views": datasets.Value("int32")}],
            "split": datasets.Value("int32"),
        }
    )


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
    import datasets

    sources = [*cfg.train, *(cfg.eval or [])]
    tasks: list[dict] = []
    for i, s in enumerate(sources):
        tasks += _chunks(resolve_path(s.path, base), i)
    table = {k: [t[k] for t in tasks] for k in tasks[0]}
    procs = max(1, min(num_proc, len(tasks)))
    t0 = time.perf_counter()
    was = datasets.is_progress_bar_enabled()
    if not on_terminal():  # the one rule for bars (progress.py)
        datasets.disable_progress_bars()
    try:
        ds = datasets.Dataset.from_dict(table).map(
            render_tasks,
            batched=True,
            batch_size=1,
            num_proc=procs if procs > 1 else None,
            remove_columns=list(table),
            features=_features(),
            fn_kwargs={
                "cfg_json": cfg.model_dump_json(),
                "tok_folder": str(tok_folder),
                "vision_json": json.dumps(None if vision is None else vision.__dict__),
                "base": str(base),
                "answers_path": answers[0],
                "answers_digest": answers[1],
                "pairs": pairs,
            },
            cache_file_name=str(folder / "samples.arrow"),
            load_from_cache_file=False,
            new_fingerprint=folder.name,
            desc=f"preparing data ({len(tasks)} parts, {procs} processes)",
        )
    finally:
        if was:
            datasets.enable_progress_bars()
    shards = sorted({Path(f["filename"]).name for f in ds.cache_files})
    status = ds.data.column("status").to_numpy()
    src = ds.data.column("src").to_numpy()
    bad = np.flatnonzero(status == BAD)
    empty = [i for i in range(len(sources)) if not (src == i).any()]  # all-blank JSONL parts
    if len(bad) or empty:
        first = bad[: cfg.max_errors].tolist()
        rows = ds.select(first).select_columns(["origin", "note"])
        errors = [SampleError(o, n) for o, n in zip(rows["origin"], rows["note"], strict=True)]
        errors += [
            SampleError(str(resolve_path(sources[i].path, base)), "empty file: no samples")
            for i in empty
        ]
        raise DataErrors(errors[: cfg.max_errors], len(bad) + len(empty) > cfg.max_errors)
    seconds = time.perf_counter() - t0
    if len(ds) >= 10_000:  # worth a line (small data sets keep error output to one line)
        print(
            f"prepared {len(ds):,} samples in {seconds:.1f} s ({len(ds) / max(seconds, 1e-9):,.0f}"
            f" samples/s, {procs} processes)",
            file=sys.stderr,
        )

    lengths = ds.data.column("length").to_numpy()
    n_train = len(cfg.train)
    train: list[int] = []
    evals: list[int] = []
    for i, s in enumerate(sources):  # the same mixing as dataset.load_samples, on indices
        mixed = _mix(np.flatnonzero(src == i).tolist(), s, seed)
        (train if i < n_train else evals).extend(mixed)
    if not cfg.eval:
        train, evals = split_eval(train, cfg.eval_split, seed)
    report = Report()
    notes, lost = ds.data.column("note"), ds.data.column("lost").to_numpy()
    for i in np.flatnonzero(status[train] != OK).tolist():  # in train order, as fit() counts
        j = train[i]
        report.note(status[j] == DROPPED, notes[j].as_py(), int(lost[j]))
    train = [i for i in train if status[i] != DROPPED]
    example = train[0] if train else -1  # the first sample training sees (never a dropped one)
    evals = [i for i in evals if status[i] != DROPPED]
    train_rows = [
        [train[j] for j in row] for row in row_indices(lengths[train].tolist(), cfg, seed)
    ]
    if cfg.packing:
        eval_rows = [
            [evals[j] for j in row] for row in row_indices(lengths[evals].tolist(), cfg, seed)
        ]
    else:
        eval_rows = [[i] for i in evals]
    train_lengths = lengths[train]
    report.samples, report.eval_samples = len(train), len(evals)
    report.tokens = int(train_lengths.sum())
    report.trainable_tokens = int(ds.data.column("trainable").to_numpy()[train].sum())
    report.images = int(ds.data.column("n_images").to_numpy()[train].sum())
    report.rows = len(train_rows)
    longest = int(train_lengths.max()) if len(train_lengths) else 0
    report.packing_efficiency = row_fill(report.tokens, len(train_rows), longest, cfg)

    def flat(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(r) for r in rows])
        members = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(offsets[-1]))
        return offsets, members

    (to, tm), (eo, em) = flat(train_rows), flat(eval_rows)
    np.savez(
        folder / "rows.npz", train_offsets=to, train_members=tm, eval_offsets=eo, eval_members=em
    )
    np.save(folder / "lengths.npy", train_lengths.astype(np.int32))
    meta = {
        "shards": shards,
        "example": example,
        "report": report.summary(),
        "truncated_at": report.truncated_at,
        "dropped_at": report.dropped_at,
        "seconds": round(seconds, 2),
        "processes": procs,
    }
    (folder / "meta.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------------------------------------
# Reading a cache folder


class PreparedRows(Sequence):
    """Rows as lists of Samples, read on demand from the memory-mapped Arrow shards."""

    def __init__(self, samples, offsets: np.ndarray, members: np.ndarray):
        self.samples, self.offsets, self.members = samples, offsets, members

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return [sample_at(self.samples, int(j)) for j in self.indices(i)]

    def indices(self, i: int) -> np.ndarray:
        """Row i's sample indices (into `samples`), in row order."""
        return self.members[self.offsets[i] : self.offsets[i + 1]]


def sample_at(samples, j: int) -> Sample:
    r = samples[j]
    images = [ImageRef(im["path"], im["views"]) for im in r["images"]]
    return Sample(r["input_ids"], r["labels"], images, r["origin"], r["split"])


@dataclass
class Prepared:
    """What `dataset.build` returns (train_rows, eval_rows, report, example), from a cache
    folder, plus where it is and whether this call built it."""

    train_rows: PreparedRows
    eval_rows: PreparedRows
    report: Report
    example: Sample | None
    folder: Path
    built: bool

    def image_refs(self) -> list[ImageRef]:
        """Every distinct image of the train and eval rows (for filling the feature cache)."""
        samples = self.train_rows.samples
        members = np.unique(np.concatenate([self.train_rows.members, self.eval_rows.members]))
        with_images = members[samples.data.column("n_images").to_numpy()[members] > 0]
        refs: dict[str, ImageRef] = {}
        for images in samples.select(with_images.tolist())["images"]:
            for im in images:
                refs.setdefault(im["path"], ImageRef(im["path"], im["views"]))
        return list(refs.values())

    def digest(self) -> str:
        """A hash of the rows' sample indices: equal on every rank that maps the same cache."""
        h = hashlib.sha256()
        for rows in (self.train_rows, self.eval_rows):
            h.update(rows.offsets.tobytes())
            h.update(rows.members.tobytes())
        return h.hexdigest()[:16]


def _load(folder: Path, built: bool) -> Prepared:
    import datasets

    meta = json.loads((folder / "meta.json").read_text())
    shards = [datasets.Dataset.from_file(str(folder / s)) for s in meta["shards"]]
    samples = shards[0] if len(shards) == 1 else datasets.concatenate_datasets(shards)
    rows = np.load(folder / "rows.npz")
    report = Report(**meta["report"])
    report.truncated_at, report.dropped_at = meta["truncated_at"], meta["dropped_at"]
    report.lengths = np.load(folder / "lengths.npy", mmap_mode="r")
    example = sample_at(samples, meta["example"]) if meta["example"] >= 0 else None
    return Prepared(
        PreparedRows(samples, rows["train_offsets"], rows["train_members"]),
        PreparedRows(samples, rows["eval_offsets"], rows["eval_members"]),
        report,
        example,
        folder,
        built,
    )


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
    cached. Raises DataErrors listing bad samples, as `dataset.build` does.

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
        return _load(folder, built=False)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        wait_for_file(folder / COMPLETE, wait_seconds, f"local rank 0 to prepare {folder}")
        return _load(folder, built=False)
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
    return _load(folder, built=True)


__all__ = ["Prepared", "PreparedRows", "prepare", "cache_key", "default_cache_dir", "IGNORE"]
