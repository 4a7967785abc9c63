"""The teacher cache: a teacher's targets for every scored token of the prepared rows, on disk.

Distillation with `distill.cache: true` runs the teacher once over the prepared training rows,
before the student is loaded (never both in memory), and the student's steps read its targets
from here. Each scored token (a position whose next-token label is not -100, in row order)
has a few (id, weight) entries: train/objectives/distill.py says what they are.

Layout (`<data cache>/teacher/<key>/`), memory-mapped when read:
- `shard-NNNNN/` for rows [N * ROWS_PER_SHARD, ...): `row_tokens.npy` int64 [rows + 1]
  (offsets into the shard's tokens), `token_entries.npy` int64 [tokens + 1] (offsets into the
  entries), `ids.npy` int32 [E], `weights.npy` float32 [E]. Bytes per scored token:
  8 x entries + 8 (docs/distillation.md gives measured figures);
- `key.json` (what the key hashes), and `COMPLETE` once every shard is written.
A shard is written under a temporary name and renamed when whole, so an interrupted fill
resumes at the first missing shard; the key covers everything the targets depend on (the
teacher's weights, the prepared data, samples, mode, temperature, seed), so a cache made for
another teacher is never read. Local rank 0 fills; the other ranks of the node wait for COMPLETE.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..outputs import wait_for_file

COMPLETE = "COMPLETE"
ROWS_PER_SHARD = 64
FORMAT_VERSION = 1


def cache_key(inputs: dict) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


Targets = tuple[np.ndarray, np.ndarray, np.ndarray]  # ids [E], weights [E], entries/token [n]


class TeacherCache:
    """Read side: `targets(row)` -> (ids int64 [E], weights float32 [E], entries per scored
    token int64 [n]) for one prepared row."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    @property
    def complete(self) -> bool:
        return (self.folder / COMPLETE).is_file()

    def _shard(self, k: int) -> dict[str, np.ndarray]:
        if k not in self._shards:
            d = self.folder / f"shard-{k:05d}"
            names = ("row_tokens", "token_entries", "ids", "weights")
            self._shards[k] = {n: np.load(d / f"{n}.npy", mmap_mode="r") for n in names}
        return self._shards[k]

    def targets(self, row: int) -> Targets:
        s = self._shard(row // ROWS_PER_SHARD)
        r = row % ROWS_PER_SHARD
        t0, t1 = int(s["row_tokens"][r]), int(s["row_tokens"][r + 1])
        offsets = np.asarray(s["token_entries"][t0 : t1 + 1])
        e0, e1 = int(offsets[0]), int(offsets[-1])
        ids = np.asarray(s["ids"][e0:e1], dtype=np.int64)
        weights = np.asarray(s["weights"][e0:e1], dtype=np.float32)
        return ids, weights, np.diff(offsets)

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*.npy"))

    def tokens(self) -> int:
        total = 0
        for d in self.folder.glob("shard-*"):
            total += int(np.load(d / "row_tokens.npy", mmap_mode="r")[-1])
        return total


def _write_shard(folder: Path, k: int, rows: list[Targets]) -> None:
    tmp = folder / f".shard-{k:05d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = [t[2] for t in rows]
    row_tokens = np.concatenate([[0], np.cumsum([len(c) for c in counts])]).astype(np.int64)
    flat = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    token_entries = np.concatenate([[0], np.cumsum(flat)]).astype(np.int64)
    np.save(tmp / "row_tokens.npy", row_tokens)
    np.save(tmp / "token_entries.npy", token_entries)
    np.save(tmp / "ids.npy", np.concatenate([t[0] for t in rows]).astype(np.int32))
    np.save(tmp / "weights.npy", np.concatenate([t[1] for t in rows]).astype(np.float32))
    os.replace(tmp, folder / f"shard-{k:05d}")


def fill(
    folder: Path,
    n_rows: int,
    targets_for: Callable[[list[int]], Iterator[Targets]],
    inputs: dict,
    wait_seconds: float = 6 * 3600,
) -> TeacherCache:
    """The complete cache in `folder`: read as it is, waited for (local ranks > 0), or filled
    shard by shard (`targets_for(rows)` yields each row's targets, in order), resuming after
    the last whole shard of an interrupted fill."""
    cache = TeacherCache(folder)
    if cache.complete:
        return cache
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        wait_for_file(folder / COMPLETE, wait_seconds, f"local rank 0 to fill {folder}")
        return cache
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "key.json").write_text(json.dumps(inputs, indent=1, sort_keys=True, default=str))
    for k in range(0, (n_rows + ROWS_PER_SHARD - 1) // ROWS_PER_SHARD):
        if (folder / f"shard-{k:05d}").is_dir():
            continue  # written whole by an earlier, interrupted fill
        rows = list(range(k * ROWS_PER_SHARD, min(n_rows, (k + 1) * ROWS_PER_SHARD)))
        _write_shard(folder, k, list(targets_for(rows)))
    (folder / COMPLETE).write_text(json.dumps({"rows": n_rows}) + "\n")
    return cache
