"""A shortened quickstart (2 steps, 3 held-out samples) runs end to end on the real 270M."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_short_quickstart(real_270m, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "gemma3-270m").symlink_to(real_270m[1])  # reuse this session's import
    env = {**os.environ, "GEMMA3_TUNE_CACHE": str(cache)}
    out = tmp_path / "qs"
    cmd = [
        sys.executable,
        str(ROOT / "scripts/quickstart.py"),
        "--steps",
        "2",
        "--eval-n",
        "3",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["metric"] == "json_exact_match" and report["n"] == 3
    assert 0 <= report["before"] <= 1 and 0 <= report["after"] <= 1
    assert (out / "merged" / "config.json").is_file() and (out / "train" / "adapter").is_dir()
    assert "| after LoRA |" in done.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert again.returncode == 2 and "--force" in again.stderr  # never replaces output silently
