"""Two nodes on one machine (two torchrun agents, one worker each, gloo over 127.0.0.1), as
`scripts/launch_multinode.sh torchrun` starts them: the same losses and adapter as one node
with 2 processes; a killed worker ends the whole job; per-node data preparation."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainutil import chat_set, free_port, losses, write_recipe

pytestmark = pytest.mark.slow  # multi-process launches: outside the fast tier

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "scripts" / "launch_multinode.sh"


def _start(
    recipe: Path, *overrides: str, nnodes: int = 2, per_node: int = 1, caches=None, hostfile=None
):
    """One launcher process per node (torchrun, or DeepSpeed's launcher without ssh when a
    hostfile is given); node i's data cache is caches[i] (node-local disks)."""
    port, procs = free_port(), []
    for node in range(nnodes):
        env = {
            **os.environ,
            "NNODES": str(nnodes), "NODE_RANK": str(node), "GPUS_PER_NODE": str(per_node),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        if caches:
            env["GEMMA3_TUNE_DATA_CACHE"] = str(caches[node])
        cmd = ["bash", str(LAUNCH), "torchrun", str(recipe), *overrides]
        if hostfile is not None:
            cmd = ["bash", str(LAUNCH), "deepspeed", str(hostfile), str(recipe), *overrides]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


def _wait(procs, timeout: int = 600) -> list[str]:
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        errs.append(err)
    return errs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir):
    """The references: one node with 2 processes, DDP and ZeRO-3, 6 steps, checkpoints at 3
    and 6."""
    d = tmp_path_factory.mktemp("nodes")
    data = chat_set(d / "chat.jsonl", n=32)
    r = write_recipe(
        d / "r.yaml", tiny_dir, data, d / "one-node-ddp",
        training__max_steps=6, training__micro_batch_size=1, training__save_steps=3,
    )  # fmt: skip
    _wait(_start(r, nnodes=1, per_node=2))
    _wait(
        _start(
            r,
            f"training.output_dir={d / 'one-node-zero3'}",
            "deepspeed=zero3",
            nnodes=1,
            per_node=2,
        )
    )
    return d, r


@pytest.mark.parametrize("stage", ["ddp", "zero3", "zero3-deepspeed-launcher"])
def test_two_nodes_equal_one_node_with_two_processes(stage, runs):
    d, r = runs
    out = d / f"two-nodes-{stage}"
    caches = [d / f"cache-{stage}-node0", d / f"cache-{stage}-node1"]
    extra = [] if stage == "ddp" else ["deepspeed=zero3"]
    hostfile = None
    if stage.endswith("launcher"):  # two "hosts", one slot each; --no_ssh: no host is contacted
        hostfile = d / "hostfile"
        hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    errs = _wait(_start(r, f"training.output_dir={out}", *extra, caches=caches, hostfile=hostfile))
    ref = d / ("one-node-ddp" if stage == "ddp" else "one-node-zero3")
    want, got = losses(ref), losses(out)
    assert len(got) == len(want) == 6
    assert got == pytest.approx(want, rel=1e-5)
    a = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    # written once: one node (global rank 0) saves checkpoints and the final adapter
    assert sum(e.count(f"saved {out / 'adapter'}") for e in errs) == 1
    for step in (3, 6):
        marker = json.loads((out / f"checkpoint-{step}" / "COMPLETE.json").read_text())
        assert marker["step"] == step
    # per-node work: each node's local rank 0 prepared the data once, into its own cache
    for cache in caches:
        prepared = [p for p in cache.iterdir() if not p.name.startswith(".")]
        assert len(prepared) == 1 and (prepared[0] / "COMPLETE").is_file()


def test_killed_worker_ends_the_job_and_names_the_rank(runs):
    d, r = runs
    out = d / "killed"
    procs = _start(
        r, f"training.output_dir={out}", "training.max_steps=400", "training.save_steps=2"
    )
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-2" / "COMPLETE.json").exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.2)
    # node 1's worker: the child of node 1's torchrun agent (the launcher execs into it)
    worker = subprocess.run(["pgrep", "-P", str(procs[1].pid)], capture_output=True, text=True)
    os.kill(int(worker.stdout.split()[0]), signal.SIGKILL)
    t0 = time.monotonic()
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert time.monotonic() - t0 <= 60, "the job outlived a dead worker by more than 60 s"
    assert all(p.returncode != 0 for p in procs)
    assert re.search(r"rank\s*:\s*1\b", errs[1]) and "SIGKILL" in errs[1], errs[1][-2000:]
