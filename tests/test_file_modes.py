"""Everything we write is readable as a plain `open()` under the user's umask would make it.

A vLLM or llama.cpp server running as another user (or in a container with another uid) must
be able to read an export made under umask 022; a user with umask 077 keeps everything private.
Temporary files from mkstemp/mkdtemp are 0600/0700 whatever the umask, so every file or folder
renamed into place is checked here: model folders, runs (adapter, checkpoints, metrics), the
data cache, the SigLIP feature cache, and every export format.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from trainutil import colour_set, write_recipe

from gemma3_tune.cli import main


def _walk(root: Path):
    yield root
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield Path(dirpath) / name


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(umask, tmp_path, monkeypatch):
    cache = tmp_path / "data-cache"
    monkeypatch.setenv("GEMMA3_TUNE_DATA_CACHE", str(cache))
    old = os.umask(umask)
    try:
        model = tmp_path / "model"
        assert main(["init-model", "--preset", "tiny-vision", "--out", str(model)]) == 0
        data = colour_set(tmp_path / "imgs", 4, seed=0, with_text_only=2)
        run = tmp_path / "run"
        recipe = write_recipe(
            tmp_path / "r.yaml",
            model,
            data,
            run,
            training__max_steps=2,
            training__save_steps=1,
            data__feature_cache=str(tmp_path / "features"),
        )
        assert main(["train", str(recipe)]) == 0
        outs = tmp_path / "exports"
        for args in (
            ["--out", str(outs / "merged")],
            ["--out", str(outs / "adapter"), "--adapter-only"],
            ["--out", str(outs / "vllm"), "--adapter-only", "--for", "vllm"],
            ["--out", str(outs / "m.gguf"), "--format", "gguf"],
        ):
            assert main(["export", str(run), *args]) == 0
    finally:
        os.umask(old)

    want = {"file": 0o666 & ~umask, "dir": 0o777 & ~umask}
    checked = {"file": 0, "dir": 0}
    wrong = []
    for root in (model, run, tmp_path / "features", cache, outs):
        for path in _walk(root):
            if path.is_symlink():
                continue
            kind = "dir" if path.is_dir() else "file"
            mode = stat.S_IMODE(path.stat().st_mode)
            checked[kind] += 1
            if mode != want[kind]:
                wrong.append(f"{path.relative_to(tmp_path)}: {mode:o}, want {want[kind]:o}")
    assert not wrong, "\n".join(wrong)
    # the walk really covered each kind of output
    assert checked["file"] > 30 and checked["dir"] > 8, checked
    assert (outs / "m.gguf").is_file() and list(outs.glob("*mmproj*.gguf"))
    assert list((tmp_path / "features").rglob("*.safetensors"))
    assert list(run.glob("checkpoint-*/*"))
