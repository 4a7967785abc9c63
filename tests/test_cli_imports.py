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
for argv in (
    ["--help"],
    ["train", "--help"],
    ["data", "check", sys.argv[1]],
    ["train", sys.argv[3]],  # into a non-empty output_dir
    ["generate", sys.argv[4]],  # no --prompt
    ["train", sys.argv[5]],  # a data file given as the recipe
    ["eval", "--help"],
    ["eval", sys.argv[5] + ".missing", "--data", sys.argv[5]],  # no such target
):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    results.append([rc, [m for m in json.loads(sys.argv[2]) if m in sys.modules]])
print("RESULT", json.dumps(results))
"""


def test_help_and_recipe_errors_import_no_heavy_module(tmp_path, tiny_dir):
    """--help, recipe typos, a taken output_dir, generate without --prompt and a data file in
    place of a recipe are all answered before torch or the trainer stack is imported."""
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model: {path: m}\ndata: {train: d.jsonl}\ntraining: {lrr: 1}\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("a user's file")
    taken = tmp_path / "taken.yaml"
    taken.write_text(
        f"model: {{path: {tiny_dir}}}\ndata: {{train: d.jsonl}}\n"
        f"training: {{output_dir: {tmp_path / 'run'}}}\n"
    )
    data = tmp_path / "chats.jsonl"
    data.write_text('{"messages": []}\n')
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(recipe), json.dumps(HEAVY), str(taken), str(tiny_dir),
         str(data)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    result = done.stdout.strip().splitlines()[-1]
    assert result.startswith("RESULT "), done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads(result.removeprefix("RESULT ")) == [[0, []], [0, []]] + [[2, []]] * 4 + [
        [0, []],
        [2, []],
    ]
    assert "unknown key training.lrr; did you mean training.lr?" in done.stderr
    assert "training.output_dir" in done.stderr and "is not empty" in done.stderr
    assert "--prompt is required" in done.stderr and "looks like a data file" in done.stderr
    assert ".missing: not found; give a run directory" in done.stderr
