"""Benchmark section `prep`: preparing 100k and 1M chats with `gemma3-tune data check`: wall time,
peak memory of the process tree, cached restart; against the old in-memory path (`python
scripts/bench.py _worker prep ...`, dispatched to `prep_worker` here).

    python scripts/bench.py --sections prep
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_harness import BENCH, GIB, process_tree


def tree_pss_gib(pid: int) -> float:
    """Memory of a process and all its descendants (worker processes included): the sum of
    their PSS (proportional set size: a page shared by k processes counts 1/k in each, so
    forked workers sharing the parent's pages are not counted k times, as an RSS sum would)."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total / GIB


def timed_tree(cmd: list[str]) -> dict:
    """Wall time and peak memory (PSS) of the whole process tree (sampled every 0.2 s)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_pss_gib(proc.pid))
        time.sleep(0.2)
    out, err = proc.communicate()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {err.strip().splitlines()[-1:]}"}
    return {"wall_s": wall, "peak_gib": peak, "stdout": out}


def prep_worker(data: str, model_dir: str) -> dict:
    """`prepare` in one process (num_proc 1) into a fresh cache: what parallel preparation
    gives. (Until 2026-12-07 this row ran the in-memory `dataset.build`, removed in issue 38,
    with and without the word memo; BENCHMARKS.md's 'before' numbers were measured so.)"""
    import tempfile

    from gemma3_tune.data.prepare import prepare
    from gemma3_tune.data.settings import DataConfig
    from gemma3_tune.model.checkpoint import read_config

    with tempfile.TemporaryDirectory() as cache:
        dc = DataConfig(train=[data], max_seq_len=2048, num_proc=1, cache_dir=cache)
        d = prepare(dc, Path(model_dir), read_config(model_dir), Path("."), 42)
        return d.report.summary()


def section_prep(args) -> str:
    from make_synthetic_chats import conversation

    from gemma3_tune.convert.embedded import embedded_model_dir

    model_dir = str(embedded_model_dir("gemma3-270m"))
    cli = [sys.executable, "-m", "gemma3_tune"]
    rows = [
        "| conversations | tokens | path | wall time | peak memory (PSS, process tree) | cached restart of `data check` |",
        "|---|---|---|---|---|---|",
    ]
    help_s = timed_tree([*cli, "--help"])["wall_s"]
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for n in args.prep_sizes:
            data = t / f"chats-{n}.jsonl"
            rng = random.Random(0)
            with data.open("w") as f:  # the same file as scripts/make_synthetic_chats.py N
                for _ in range(n):
                    f.write(json.dumps(conversation(rng)) + "\n")
            recipe = t / f"r-{n}.yaml"
            recipe.write_text(
                f"model: {{path: {model_dir}}}\n"
                f"data: {{train: {data}, max_seq_len: 2048, cache_dir: {t / 'cache'}}}\n"
            )
            new = timed_tree([*cli, "data", "check", str(recipe), "--json"])
            again = timed_tree([*cli, "data", "check", str(recipe), "--json"])
            print(f"prep {n}: new {new} | cached {again}", flush=True)
            if "error" in new:
                rows.append(f"| {n:,} | | prepare | {new['error']} | | |")
                continue
            summary = json.loads(new["stdout"].strip().splitlines()[-1])
            rows.append(
                f"| {n:,} | {summary['tokens'] / 1e6:.1f}M | `data check` (prepare, cold cache)"
                f" | {new['wall_s']:.1f} s | {new['peak_gib']:.2f} GiB | {again['wall_s']:.1f} s |"
            )
            if n <= args.prep_old_max:
                worker = [sys.executable, str(BENCH), "_worker", "prep"]
                old = timed_tree([*worker, str(data), model_dir])
                print(f"prep {n}: one process {old}", flush=True)
                cell = old.get("error") or f"{old['wall_s']:.1f} s"
                ratio = (
                    ""
                    if "error" in old
                    else f" ({old['wall_s'] / new['wall_s']:.1f}x the new time)"
                )
                peak = "" if "error" in old else f"{old['peak_gib']:.2f} GiB"
                label = "`prepare` in one process (num_proc 1), no cache"
                rows.append(f"| {n:,} | | {label} | {cell}{ratio} | {peak} | none (no cache) |")
            shutil.rmtree(t / "cache", ignore_errors=True)
            data.unlink()
    return (
        "Synthetic chats from `scripts/make_synthetic_chats.py` (seed 0: log-normal lengths,"
        " 1-3 exchanges, some system prompts), the real Gemma 3 270M tokenizer, max_seq_len"
        f" 2048, packing on, {os.cpu_count()} worker processes. Wall time includes the CLI's"
        f" start-up (`gemma3-tune --help` alone: {help_s:.1f} s). Peak memory sums the PSS of the"
        " main process and its workers, sampled every 0.2 s (a page shared by k processes counts"
        " 1/k in each; an RSS sum would count the forked workers' shared pages k times). The one-process row is `prepare` with num_proc 1, in the same run.\n\n"
        + "\n".join(rows)
    )
