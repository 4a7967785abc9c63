"""Golden values: what the data pipeline gave once, recorded and compared on every run.

The prepared rows of tests/test_data.py and the notes of tests/test_data_report.py were
recorded from the in-memory `dataset.build` (the second pipeline, removed since) when
`prepare` gave the very same rows; they now hold `prepare` to them. Re-record after a change
that is meant to alter the rows, and review the diff:

    GEMMA3_TUNE_GOLDEN=write .venv/bin/python -m pytest -p no:xdist tests/test_data.py \\
        tests/test_data_report.py

Paths under a test's folder are written relative to it, so the values hold on any machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FILE = Path(__file__).parent / "golden" / "prepared_rows.json"


def check(name: str, value) -> None:
    """`value` equals the recorded value `name` (or is recorded, with GEMMA3_TUNE_GOLDEN=write)."""
    value = json.loads(json.dumps(value))  # tuples as lists, as the file holds them
    if os.environ.get("GEMMA3_TUNE_GOLDEN") == "write":
        recorded = json.loads(FILE.read_text()) if FILE.is_file() else {}
        recorded[name] = value
        FILE.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return
    assert value == json.loads(FILE.read_text())[name], name


def relative(text: str, base: Path) -> str:
    return text.replace(f"{base}/", "")


def rows(data, base: Path) -> dict:
    """Prepared data as comparable values: each sample as one line (origin, tokens, trained
    tokens, images and a hash of its ids, labels and images), the report, the example."""

    def sample(s) -> str:
        images = [[relative(im.path, base), im.views] for im in s.images]
        blob = json.dumps([list(s.input_ids), list(s.labels), images, s.split])
        digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
        return (
            f"{relative(s.origin, base)} tokens={len(s)} trained={s.trainable}"
            f" images={len(s.images)} {digest}"
        )

    report = data.report
    return {
        "train_rows": [[sample(s) for s in r] for r in data.train_rows],
        "eval_rows": [[sample(s) for s in r] for r in data.eval_rows],
        "report": report.summary(),
        "truncated_at": [relative(n, base) for n in report.truncated_at],
        "dropped_at": [relative(n, base) for n in report.dropped_at],
        "lengths": [int(n) for n in report.lengths],
        "example": relative(data.example.origin, base) if data.example else None,
    }
