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


def test_sizes_keep_to_the_goals():
    """Issue 38's goals, kept: no function over 80 lines, no module over 450, and the trainer
    importing fewer than 25 of our names (it reads as a list of steps)."""
    s = SHAPE["shape"]()
    assert s["longest_functions"][0][0] <= 80, s["longest_functions"][0]
    assert s["largest_modules"][0][0] <= 450, s["largest_modules"][0]
    assert s["trainer_imported_names"] < 25
