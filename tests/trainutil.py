"""Helpers for training tests: tiny datasets and recipes."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
}


def chat_set(path: Path, n: int = 24, seed: int = 0) -> Path:
    """A small, learnable chat set: each reply repeats a fixed phrase with the question's number."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            k = rng.randint(0, 9)
            msgs = [
                {"role": "user", "content": f"number {k}"},
                {"role": "assistant", "content": f"the answer is {k} {k}"},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def colour_set(folder: Path, n: int, seed: int, with_text_only: int = 0) -> Path:
    """Solid-colour pictures, each asked 'What colour is this?', answered with its colour name."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = rng.choice(list(COLOURS))
        rgb = np.array(COLOURS[name]) + rng.randint(-20, 20)
        img = np.clip(
            np.ones((24 + rng.randint(0, 20), 24 + rng.randint(0, 20), 3)) * rgb, 0, 255
        ).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{seed}_{i}.png")
        content = [
            {"type": "image", "image": f"{seed}_{i}.png"},
            {"type": "text", "text": "What colour is this?"},
        ]
        lines.append(
            {
                "messages": [
                    {"role": "user", "content": content},
                    {"role": "assistant", "content": name},
                ]
            }
        )
    for i in range(with_text_only):
        lines.append(
            {
                "messages": [
                    {"role": "user", "content": f"say {i}"},
                    {"role": "assistant", "content": f"{i}"},
                ]
            }
        )
    out = folder / f"colours_{seed}.jsonl"
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return out


def write_recipe(path: Path, model: Path, data: Path, out: Path, **over) -> Path:
    recipe = {
        "model": {"path": str(model), "dtype": "float32"},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(data), "max_seq_len": 128},
        "training": {
            "output_dir": str(out),
            "max_steps": 20,
            "micro_batch_size": 2,
            "lr": 5e-3,
            "save_steps": 10,
            "seed": 0,
            "logging_steps": 1,  # the tests read every step's loss
        },
    }
    for key, value in over.items():
        node = recipe
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


def losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test's process-group rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused_in_one_line(capsys, argv: list[str], *needles: str) -> str:
    """`gemma3-tune ARGV` exits 2 with one `error: ` line holding every needle; returns it."""
    from gemma3_tune.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, err
    return err


def sigkill_and_resume_matches(tmp_path: Path, make) -> None:
    """GRPO's resume check: run `make("unbroken")`; run `make("killed")`, SIGKILL it once checkpoint-4 is complete,
    resume it; the two runs' completions, losses and adapters agree."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from gemma3_tune.cli import main
    from gemma3_tune.train.checkpoints import MARKER

    assert main(["train", str(make("unbroken"))]) == 0
    recipe, run = make("killed"), tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "gemma3_tune.cli", "train", str(recipe)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (run / "checkpoint-4" / MARKER).exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    from gemma3_tune.cli import main

    assert main(["train", str(recipe), "training.resume=true"]) == 0
    want, got = tmp_path / "unbroken", run
    rows = [json.loads(x) for x in (want / "completions.jsonl").read_text().splitlines()]
    assert len({r["completion"] for r in rows}) > 4 and any(r["advantage"] for r in rows)
    assert (got / "completions.jsonl").read_text() == (want / "completions.jsonl").read_text()
    a, b = (
        [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (want, got)
    )
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert all(abs(x["loss"] - y["loss"]) <= 1e-5 for x, y in zip(a, b, strict=True))
    wa, wb = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (want, got))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
