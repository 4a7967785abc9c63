"""The package's import layers, read from the source by scripts/shape.py: model/ imports nothing
of ours but the shared error type, and no module of ours, nor any script, takes part in an
import cycle (lazy imports inside functions included)."""

from __future__ import annotations

import runpy
from pathlib import Path

SHAPE = runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "shape.py"))


def test_model_is_a_leaf():
    assert SHAPE["shape"]()["model_imports_of_ours"] == []


def test_no_import_cycle():
    assert SHAPE["shape"]()["import_cycles"] == []


def test_scripts_are_read_too():
    """bench.py and its section modules imported each other before bench_harness.py: the
    finder sees imports between scripts/*.py by file name."""
    assert SHAPE["script_cycles"]() == []
    graph = {"bench": {"bench_preference"}, "bench_preference": {"bench"}}
    assert SHAPE["cycles"](graph) == [["bench", "bench_preference"]]


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert SHAPE["cycles"](graph) == [["a", "b", "c"]]
