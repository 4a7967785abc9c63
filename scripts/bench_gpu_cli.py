"""Section gpu's `cli` table: tokens/s of real `gemma3-tune train` runs on one CUDA card (1B
preset, variable-length chats, LoRA r=16, bf16), unpacked and packed.

    python scripts/bench.py --sections gpu --cases cli --gpu-cli-steps 30 --no-append
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_harness import ROOT, chat_lengths


def _chat_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    """Chats with log-normal token counts (median ~350), as in section packing."""
    rng = random.Random(seed)
    words = "the a model data token train answer question value result".split()
    with path.open("w") as f:
        for length in chat_lengths(n, seed):
            reply = " ".join(rng.choice(words) for _ in range(max(4, length - 20)))
            msgs = [
                {"role": "user", "content": f"Question {rng.randint(0, 10**6)}?"},
                {"role": "assistant", "content": reply},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def gpu_cli_rows(args) -> list[str]:
    """tokens/s of a real `gemma3-tune train` run (1B preset, variable-length chats, LoRA r=16,
    bf16), unpacked and packed: the median of metrics.jsonl's tokens_per_second after the
    first 5 steps (compilation)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        cli = [sys.executable, "-m", "gemma3_tune"]
        subprocess.run(
            [*cli, "init-model", "--preset", "1b", "--out", str(t / "1b")], check=True, env=env
        )
        data = _chat_jsonl(t / "chats.jsonl", 4000)
        for packing, micro in ((False, 4), (True, 1)):
            out = t / f"run-{packing}"
            cmd = [
                *cli, "train", str(ROOT / "recipes" / "chat-lora-1b.yaml"),
                f"model.path={t / '1b'}", f"data.train={data}", "data.eval=null", "data.eval_split=0",
                "data.max_seq_len=8192", f"data.packing={str(packing).lower()}",
                f"training.micro_batch_size={micro}", "training.grad_accum=1",
                f"training.max_steps={args.gpu_cli_steps}", "training.save_steps=100000",
                "training.eval_steps=null", "training.gradient_checkpointing=false",
                f"training.output_dir={out}",
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            label = f"`gemma3-tune train`, 1B, {'packed 8K rows' if packing else f'unpacked, micro-batch {micro}'}"
            if proc.returncode != 0:
                rows.append(
                    f"| {label} | exit {proc.returncode}: {proc.stderr.strip()[-200:]} | | | |"
                )
                continue
            logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            tps = [r["tokens_per_second"] for r in logs if r.get("tokens_per_second")][5:]
            peak = max(r.get("peak_memory_gb") or 0 for r in logs)
            rows.append(f"| {label} | {statistics.median(tps):,.0f} | | | {peak:.1f} GiB |")
    return rows
