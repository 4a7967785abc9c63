"""The samples table: every record of the data's sources rendered into one Arrow row, by
`num_proc` worker processes through `datasets.map`.

JSONL sources are cut into byte ranges at line starts (`parts`), other sources are one part
each; a worker renders its parts' records (`documents.record_documents`: a chat's sample, a raw
text document's windows, a prompt-completion row's sample; `preference.render_pair` for
pairs), checks each against max_seq_len (`dataset.fit_one`) and writes one row per sample:
input_ids, labels, images, origin, length, status (OK, TRUNCATED, DROPPED or BAD), the note
saying why, and a raw text window's number. Nothing is held in Python lists; `bad_samples` turns the BAD rows into one
DataErrors, as a run reports them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..progress import on_terminal
from .answers import AnswerStore, answered
from .dataset import DataErrors, fit_one
from .documents import record_documents
from .preference import render_pair
from .records import SampleError
from .settings import DataConfig, Source, resolve_path, turn_options
from .sources import read_jsonl, read_records
from .template import Sample, VisionTokens
from .tokenizer import Tokenizer

CHUNK_BYTES = 4 << 20  # JSONL bytes per map task: small enough for a smooth progress bar
OK, TRUNCATED, DROPPED, BAD = 0, 1, 2, 3  # the `status` column
COLUMNS = (
    "src",  # the source's index: train sources, then eval sources
    "origin",
    "status",
    "note",  # why a sample was truncated, dropped or bad
    "length",
    "lost",  # tokens cut or dropped
    "trainable",
    "n_images",
    "input_ids",
    "labels",
    "images",
    "split",
    "window",  # a raw text document's window number, from 1 (0: not raw text)
)


def parts(path: Path, src: int) -> list[dict]:
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
        return read_jsonl(path, task["start"], task["end"], task["line"])
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
    reply = None
    if answers is not None:  # prompts get the teacher's reply

        def reply(turns, origin):
            return answered(turns, tok, vision, answers, origin)

    cols: dict[str, list] = {k: [] for k in COLUMNS}

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
        cols["window"].append(sample.window if sample else 0)

    for i in range(len(batch["src"])):
        task = {k: batch[k][i] for k in batch}
        path = Path(task["path"])
        options = turn_options(cfg, Path(base), path)
        try:
            for rec in _records(task):
                try:
                    if pairs:
                        samples = [render_pair(rec, tok, vision, options)]
                    else:
                        samples = record_documents(rec, tok, vision, options, cfg, reply)
                except SampleError as e:
                    add(task["src"], e.origin, BAD, e.reason, None)
                    continue
                for sample in samples:  # a raw text document: its windows
                    kept, note = fit_one(sample, cfg, vision)
                    status = OK if not note else DROPPED if kept is None else TRUNCATED
                    lost = len(sample) - (len(kept) if kept else 0)
                    add(task["src"], sample.origin, status, note, kept, lost)
        except SampleError as e:  # the whole source is unreadable
            add(task["src"], e.origin, BAD, e.reason, None)
    return cols


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
            "window": datasets.Value("int32"),
        }
    )


def render_sources(
    folder: Path,
    sources: list[Source],
    cfg: DataConfig,
    tok_folder: Path,
    vision: VisionTokens | None,
    base: Path,
    num_proc: int,
    answers: tuple[str, str] = ("", ""),
    pairs: bool = False,
):
    """The samples table of `sources` (train, then eval), written to `folder`/samples.arrow
    (one shard per process), and how many processes wrote it. `answers`: (store file, digest)."""
    import datasets

    tasks: list[dict] = []
    for i, s in enumerate(sources):
        tasks += parts(resolve_path(s.path, base), i)
    table = {k: [t[k] for t in tasks] for k in tasks[0]}
    procs = max(1, min(num_proc, len(tasks)))
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
    return ds, procs


def bad_samples(ds, sources: list[Source], cfg: DataConfig, base: Path) -> DataErrors | None:
    """The table's bad samples (up to data.max_errors, in file order) and its sources with no
    sample at all (all-blank JSONL parts), as one DataErrors; None when there are none."""
    status = ds.data.column("status").to_numpy()
    src = ds.data.column("src").to_numpy()
    bad = np.flatnonzero(status == BAD)
    empty = [i for i in range(len(sources)) if not (src == i).any()]
    if not len(bad) and not empty:
        return None
    first = bad[: cfg.max_errors].tolist()
    rows = ds.select(first).select_columns(["origin", "note"])
    errors = [SampleError(o, n) for o, n in zip(rows["origin"], rows["note"], strict=True)]
    errors += [
        SampleError(str(resolve_path(sources[i].path, base)), "empty file: no samples")
        for i in empty
    ]
    return DataErrors(errors[: cfg.max_errors], len(bad) + len(empty) > cfg.max_errors)
