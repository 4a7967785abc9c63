"""Best-fit-decreasing packing of whole samples into rows of `max_seq_len` tokens.

Each sample keeps its own positions (restarting at 0), so the model's masks keep documents
apart; images travel with their sample. Deterministic for a seed: ties in length are broken
by a seeded shuffle, and the finished rows are shuffled with the same seed.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence


def pack(lengths: Sequence[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Group sample indices into rows whose lengths sum to at most `capacity`.

    Best fit decreasing: longest first, each into the fullest row it still fits in.
    """
    if any(n > capacity for n in lengths):
        raise ValueError("pack() needs every sample to fit; truncate or drop long ones first")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: the shuffle decides ties
    rows: list[list[int]] = []
    # (free space, row index), kept sorted: bisect finds the tightest row that still fits.
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
        else:
            space, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (space - n, r))
    rng.shuffle(rows)
    return rows


def efficiency(lengths: Sequence[int], rows: list[list[int]], capacity: int) -> float:
    """Real tokens / row capacity."""
    return sum(lengths) / (len(rows) * capacity) if rows else 1.0
