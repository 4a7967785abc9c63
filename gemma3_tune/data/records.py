"""A record read from a data source, and the error that names a bad one: the leaf every step
from reading to rendering raises its one-line errors with."""

from __future__ import annotations

from dataclasses import dataclass


class SampleError(ValueError):
    """One bad sample: `origin` is "file:line" (or "file:row N"); the message says why."""

    def __init__(self, origin: str, reason: str):
        super().__init__(f"{origin}: {reason}")
        self.origin, self.reason = origin, reason


@dataclass
class Record:
    origin: str  # "path:line" or "path:row N"
    data: object  # the decoded JSON object (or table row as a dict)
