"""A prepared-data folder: its files, written once and mapped back by every later run.

- `samples*.arrow`: the samples table (sample_table.py), one shard per worker process;
- `rows.npz`: train and eval rows as sample indices (offsets and members), never as copies of
  the tokens; `lengths.npy`: the training samples' lengths (for the report's histogram);
- `meta.json`: the shards, the example sample's index, the report, the truncation and drop
  notes, how long preparing took and with how many processes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dataset import Report
from .template import ImageRef, Sample


def _flat(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows as (offsets, members): row i is members[offsets[i] : offsets[i + 1]]."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    members = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(offsets[-1]))
    return offsets, members


def write(
    folder: Path,
    ds,
    train_rows: list[list[int]],
    eval_rows: list[list[int]],
    train_lengths: np.ndarray,
    example: int,
    report: Report,
    seconds: float,
    procs: int,
) -> None:
    """The rows, lengths and meta.json beside the samples table `ds` (already in `folder`);
    `example`: the index of the first sample training sees, -1 when there is none."""
    (to, tm), (eo, em) = _flat(train_rows), _flat(eval_rows)
    np.savez(
        folder / "rows.npz", train_offsets=to, train_members=tm, eval_offsets=eo, eval_members=em
    )
    np.save(folder / "lengths.npy", train_lengths.astype(np.int32))
    meta = {
        "shards": sorted({Path(f["filename"]).name for f in ds.cache_files}),
        "example": example,
        "report": report.summary(),
        "truncated_at": report.truncated_at,
        "dropped_at": report.dropped_at,
        "seconds": round(seconds, 2),
        "processes": procs,
    }
    (folder / "meta.json").write_text(json.dumps(meta))


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
    """The data a run trains on: train and eval rows, the report and the example sample (the
    first one training sees), from a cache folder, plus where it is and whether this call
    built it."""

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


def load(folder: Path, built: bool) -> Prepared:
    """Map a complete folder's files."""
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
