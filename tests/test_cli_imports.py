"""The CLI answers `--help` and recipe mistakes without importing torch or transformers: those
load only inside the commands that need them (about a second instead of ~9 s)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "datasets", "trl", "peft", "deepspeed")

PROBE = """
import json, sys
from gemma3_tune.cli import main
results = []
for argv in (["--help"], ["train", "--help"], ["data", "check", sys.argv[1]]):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    results.append([rc, [m for m in json.loads(sys.argv[2]) if m in sys.modules]])
print("RESULT", json.dumps(results))
"""


def test_help_and_recipe_errors_import_no_heavy_module(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model: {path: m}\ndata: {train: d.jsonl}\ntraining: {lrr: 1}\n")
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(recipe), json.dumps(HEAVY)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    result = done.stdout.strip().splitlines()[-1]
    assert result.startswith("RESULT "), done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads(result.removeprefix("RESULT ")) == [[0, []], [0, []], [2, []]]
    assert "unknown key training.lrr; did you mean training.lr?" in done.stderr
