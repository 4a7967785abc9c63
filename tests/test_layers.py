"""The package's import layers, read from the source by scripts/shape.py: model/ imports nothing
of ours but the shared error type, and no import cycle exists beyond the one data/ still has
(issue 38: answers, dataset, preference, prepare, sources; this list may only shrink)."""

from __future__ import annotations

import runpy
from pathlib import Path

SHAPE = runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "shape.py"))
KNOWN_CYCLE = {
    f"gemma3_tune.data.{m}" for m in ("answers", "dataset", "preference", "prepare", "sources")
}


def test_model_is_a_leaf():
    assert SHAPE["shape"]()["model_imports_of_ours"] == []


def test_no_import_cycle_but_the_known_one():
    cycles = SHAPE["shape"]()["import_cycles"]
    assert all(set(c) <= KNOWN_CYCLE for c in cycles), cycles


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert SHAPE["cycles"](graph) == [["a", "b", "c"]]
