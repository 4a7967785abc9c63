"""Resume on another world size: a run checkpointed with 2 processes continues with 1, and one
from 1 continues with 2 (the global batch kept by training.grad_accum), under DDP, ZeRO-2 and
ZeRO-3. The data order continues where it stopped (every row of the epoch once, each step
the rows of an unbroken run), the optimizer state carries over, and the losses and adapter
equal an unbroken run's up to the reduction order."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainutil import chat_set, free_port, losses, write_recipe

pytestmark = pytest.mark.slow  # multi-process launches: outside the fast tier

ROWS, STEPS = 12, 6  # 12 rows, global batch 2: one epoch in 6 steps; checkpoints at 3 and 6


def _run(recipe: Path, out: Path, procs: int, *overrides: str) -> None:
    """`train` with `procs` processes and the global batch of 2 (micro 1 x accum x procs)."""
    accum = 2 // procs
    args = [str(recipe), f"training.output_dir={out}", f"training.grad_accum={accum}", *overrides]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
           "--master_port", str(free_port()), "-m", "gemma3_tune", "train", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GEMMA3_TUNE_TRACE_ROWS": str(out / "trace")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def _steps(out: Path, upto: int | None = None, after: int = 0) -> dict[int, list[int]]:
    """step -> sorted row numbers trained at that step, over every rank's trace."""
    steps: dict[int, list[int]] = {}
    for f in out.glob("trace.*"):
        for line in f.read_text().splitlines():
            step, *rows = map(int, line.split())
            if after < step <= (upto or step):
                steps.setdefault(step, []).extend(rows)
    return {s: sorted(r) for s, r in sorted(steps.items())}


def _broken(src: Path, dest: Path) -> Path:
    """The run `src` as if it had stopped after its checkpoint at step 3."""
    dest.mkdir()
    shutil.copytree(src / "checkpoint-3", dest / "checkpoint-3")
    for name in ("metrics.jsonl", "recipe.yaml"):
        shutil.copy(src / name, dest / name)
    for trace in src.glob("trace.*"):
        lines = [x for x in trace.read_text().splitlines() if int(x.split()[0]) <= 3]
        (dest / trace.name).write_text("".join(x + "\n" for x in lines))
    return dest


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("resume")
    data = chat_set(d / "chat.jsonl", n=ROWS)
    r = write_recipe(
        d / "r.yaml", tiny_dir, data, d / "unused",
        data__packing=False, training__max_steps=STEPS, training__micro_batch_size=1,
        training__save_steps=3, training__lr=1e-2,
    )  # fmt: skip
    return d, r


STAGES = ["ddp", "zero2", "zero3"]


@pytest.mark.parametrize("stage", STAGES)
def test_resume_on_another_world_size(stage, recipe):
    d, r = recipe
    ds = [] if stage == "ddp" else [f"deepspeed={stage}"]
    one, two = d / f"{stage}-1", d / f"{stage}-2"
    _run(r, one, 1, *ds)  # unbroken, 1 process
    _run(r, two, 2, *ds)  # unbroken, 2 processes
    want = _steps(one)
    assert _steps(two) == want  # the same global order on either world size
    assert sorted(x for rows in want.values() for x in rows) == list(range(ROWS))
    assert len(want) == STEPS
    for src, procs, ref in ((two, 1, one), (one, 2, two)):  # 2 -> 1 and 1 -> 2
        out = _broken(src, d / f"{stage}-{src.name[-1]}-to-{procs}")
        _run(r, out, procs, *ds, "training.resume=true")
        got = _steps(out)
        assert got == want, (got, want)  # no row twice, none skipped, same steps
        assert len(losses(out)) == STEPS
        assert losses(out) == pytest.approx(losses(ref), rel=1e-5)  # continuous loss curve
        a = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        for k in a:  # optimizer state carried over: a reset AdamW would land far from this
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


def test_resume_refuses_another_global_batch(tmp_path):
    """On another world size the data order continues only with the same global batch: a
    resume that would change it is refused with the grad_accum that keeps it."""
    import yaml

    from gemma3_tune.errors import UserError
    from gemma3_tune.train.checkpoints import mark_complete, written_by
    from gemma3_tune.train.recipe import load_recipe
    from gemma3_tune.train.resume import check_global_batch

    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    mark_complete(ckpt, world_size=2, global_batch=4)  # 2 processes x micro 1 x accum 2
    assert written_by(ckpt) == (2, 4)
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"train": "d.jsonl"}}))
    check_global_batch(load_recipe(p, ["training.grad_accum=4"]), ckpt, 4)  # 1 x 1 x 4: fine
    with pytest.raises(UserError, match="global batch of 4 .* set training.grad_accum=4"):
        check_global_batch(load_recipe(p, ["training.grad_accum=2"]), ckpt, 4)
