"""What every benchmark section shares: the machine's description, one measurement per fresh
process (`run_worker`, which runs `scripts/bench.py _worker ...`), timing, peak memory, the
LoRA targets both sides use, and the student model, chat tokens and chat-length mix several
sections use. Section modules (scripts/bench_<section>.py, bench_precision.py) import this,
never bench.py, which only parses arguments and dispatches to them.
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
BENCH = ROOT / "scripts" / "bench.py"  # its `_worker` command runs one measurement

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 1024**3


# ---------------------------------------------------------------------------------------------
# Machine and helpers


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, no GPU"


def matmul_gflops(dtype: torch.dtype, n: int = 1024) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    reps, t = 3, time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB


def run_worker(args: list[str], timeout: float | None = None) -> dict:
    """One measurement in a fresh process; its last stdout line is a JSON result. With a
    timeout, a worker still running after `timeout` seconds is killed with its children
    (inductor's compile workers) and reported as timed out, so one slow side cannot eat the
    time of the others."""
    cmd = [sys.executable, str(BENCH), "_worker", *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in process_tree(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode == -9:
        return {"error": "killed: out of memory (SIGKILL from the OOM killer)"}
    if proc.returncode != 0:
        tail = (stderr or stdout).strip().splitlines()[-1:]
        return {"error": f"exit {proc.returncode}: {tail[0][:200] if tail else ''}"}
    return json.loads(stdout.strip().splitlines()[-1])


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, read from /proc (parents before children)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def timed_steps(step, steps: int, sync=lambda: None) -> list[float]:
    """One warm-up step, then `steps` timed ones."""
    step()
    sync()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        out.append(time.perf_counter() - t)
    return out


def chat_lengths(n: int, seed: int = 0) -> list[int]:
    """Token counts of a mixed chat set: log-normal, median 350, long tail (multi-turn and
    code), clipped to [24, 12000]: the shape of public SFT mixes such as UltraChat/Tulu."""
    rng = random.Random(seed)
    return [min(12000, max(24, int(rng.lognormvariate(5.86, 0.9)))) for _ in range(n)]


def chat_tokens(model_dir: Path, seq: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """`seq` tokens of quickstart-style chat rendered with our template: (input_ids, labels)
    with the loss on assistant tokens only, as in chat SFT."""
    from make_quickstart_data import sample

    from gemma3_tune.data.template import Turn, render
    from gemma3_tune.data.tokenizer import Tokenizer

    tok, rng = Tokenizer(model_dir), random.Random(seed)
    ids: list[int] = []
    labels: list[int] = []
    while len(ids) < seq:
        msgs = sample(rng)["messages"]
        s = render([Turn(m["role"], [m["content"]]) for m in msgs], tok, None)
        ids += s.input_ids
        labels += s.labels
    return ids[:seq], labels[:seq]


def student(model_dir: str):
    """The real 270M with LoRA r=16 on every decoder linear, fp32, SDPA: the student the
    distillation and preference sections train."""
    import peft

    from gemma3_tune.model.checkpoint import load_model
    from gemma3_tune.train.adapters import target_regex

    torch.manual_seed(0)
    model = load_model(model_dir, dtype=torch.float32, attn_backend="sdpa")
    cfg = peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=target_regex("all-linear")
    )
    return peft.get_peft_model(model, cfg)
