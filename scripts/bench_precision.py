"""Precision on CPU: what `model.dtype: auto` buys, and whether float16 trains.

    python scripts/bench_precision.py auto     # quickstart in fp32 and bf16: step time, eval
    python scripts/bench_precision.py fp16     # the real 270M in fp16 vs fp32: logits, 5 steps

`auto`: `gemma3-tune train recipes/quickstart.yaml` with model.dtype=float32 and =bfloat16, one
after the other on the same data and seed, then `gemma3-tune eval` of each run in its own dtype
on the 60 held-out chats (metric json, the quickstart's): median step seconds (steps 2-24), one
decode step of our KV-cache decoder at the eval's batch of 16, eval seconds end to end (model
load included), the longest reply, and the score. On a CPU without AVX512-BF16 or AMX the bf16 arm is ~100x slower: it is skipped there.

`fp16`: the real 270M's logits in fp16 and bf16 against fp32 on held-out chats (the full
rendered chat, every position), and the first 5 steps of the quickstart recipe in fp32, fp16 and
bf16 (losses side by side), at the quickstart's lr and at a tenth of it.

Prints a markdown block for BENCHMARKS.md, headed by the CPU and its bf16/fp16 flags.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gemma3_tune.model.dtypes import cpu_flags, dtype_name  # noqa: E402

EVAL = ROOT / "data/quickstart/eval.jsonl"
CLI = [sys.executable, "-m", "gemma3_tune"]


def header() -> str:
    from bench_harness import machine

    flags = sorted(f for f in cpu_flags() if "bf16" in f or "fp16" in f or f.startswith("amx"))
    return f"Machine: {machine()}; CPU flags: {' '.join(flags) or 'no bf16/fp16/AMX flags'}"


def train(dtype: str, out: Path, *over: str) -> list[dict]:
    """One quickstart run in `dtype`; its metrics.jsonl rows."""
    cmd = [*CLI, "train", str(ROOT / "recipes/quickstart.yaml"), f"model.dtype={dtype}"]
    cmd += [f"training.output_dir={out}", *over]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def evaluate(run: Path, dtype: str) -> tuple[float, float, int]:
    """(held-out json score, seconds, longest reply in tokens) of `gemma3-tune eval` on the
    run, decoding in `dtype`. A batch decodes until its longest reply stops, so one reply that
    never ends (to --max-new-tokens, 128) sets the time of its batch of 16."""
    from gemma3_tune.convert.embedded import embedded_model_dir
    from gemma3_tune.data.tokenizer import Tokenizer

    out = run.parent / f"{run.name}-eval"
    cmd = [*CLI, "eval", str(run), "--data", str(EVAL), "--metric", "json", "--dtype", dtype]
    t = time.perf_counter()
    done = subprocess.run(
        [*cmd, "--json", "--out", str(out)], check=True, cwd=ROOT, capture_output=True, text=True
    )
    seconds = time.perf_counter() - t
    tok = Tokenizer(embedded_model_dir("gemma3-270m"))
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    longest = max(len(tok.encode(r["targets"][str(run)]["reply"])) for r in rows)
    return json.loads(done.stdout.strip().splitlines()[-1])["scores"][str(run)], seconds, longest


def decode_step_seconds(dtype: torch.dtype, batch: int = 16, steps: int = 40) -> float:
    """Seconds per decode step of our KV-cache decoder on the real 270M: `batch` prompts of
    ~120 tokens (the eval's batch), every row decoding `steps` tokens."""
    from gemma3_tune.convert.embedded import embedded_model_dir
    from gemma3_tune.model import load_model
    from gemma3_tune.model.generate import generate_batch

    model = load_model(embedded_model_dir("gemma3-270m"), dtype=dtype).eval()
    prompts = [list(range(1000, 1120 + i)) for i in range(batch)]
    with torch.no_grad():
        generate_batch(model, prompts, max_new_tokens=2)  # warm-up
        t = time.perf_counter()
        generate_batch(model, prompts, max_new_tokens=1)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        generate_batch(model, prompts, max_new_tokens=steps + 1, stop_ids=set())
    return (time.perf_counter() - t - prefill) / steps


def section_auto() -> str:
    from gemma3_tune.model.dtypes import native_bf16_cpu

    rows = ["| model.dtype | median s/step | tok/s | decode step (batch 16) | eval s (60 chats)"]
    rows[0] += " | longest reply | held-out json |"
    rows.append("|---" * 7 + "|")
    dtypes = ["float32", "bfloat16"] if native_bf16_cpu() else ["float32"]
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            run = Path(tmp) / dtype
            steps = [r for r in train(dtype, run, "training.logging_steps=1") if "loss" in r]
            sec = statistics.median(r["step_seconds"] for r in steps[1:])
            tps = statistics.median(r["tokens_per_second"] for r in steps[1:])
            score, eval_s, longest = evaluate(run, dtype)
            step = decode_step_seconds(getattr(torch, dtype))
            rows.append(
                f"| {dtype} | {sec:.2f} | {tps:.0f} | {step * 1000:.0f} ms | {eval_s:.0f} s"
                f" | {longest} tokens | {score:.1%} |"
            )
    if len(dtypes) == 1:
        rows.append("| bfloat16 | not measured on such a CPU |" + " |" * 5)
    return "\n".join(rows)


def logits_vs_fp32(folder: Path, dtype: torch.dtype, n: int = 20) -> tuple[float, float, float]:
    """(max |`dtype` - fp32| logit, max |fp32 logit|, share of positions with the same argmax)."""
    from gemma3_tune.data.sources import read_records, to_turns
    from gemma3_tune.data.template import render
    from gemma3_tune.data.tokenizer import Tokenizer
    from gemma3_tune.model import load_model

    tok = Tokenizer(folder)
    ref = load_model(folder, dtype=torch.float32).eval()
    half = load_model(folder, dtype=dtype).eval()
    worst = top = 0.0
    same = total = 0
    with torch.no_grad():
        for record in list(read_records(str(EVAL)))[:n]:
            ids = torch.tensor([render(to_turns(record, base=EVAL.parent), tok, None).input_ids])
            a, b = ref(ids).logits.float(), half(ids).logits.float()
            assert torch.isfinite(b).all(), f"{dtype} logits not finite"
            worst = max(worst, (a - b).abs().max().item())
            top = max(top, a.abs().max().item())
            same += (a.argmax(-1) == b.argmax(-1)).sum().item()
            total += ids.shape[1]
    return worst, top, same / total


def section_fp16() -> str:
    from gemma3_tune.convert.embedded import embedded_model_dir

    lines = []
    for dtype in (torch.float16, torch.bfloat16):
        worst, top, agree = logits_vs_fp32(embedded_model_dir("gemma3-270m"), dtype)
        lines.append(
            f"- logits, {dtype_name(dtype)} vs float32, 20 held-out chats (every position): max"
            f" |diff| {worst:.3f} (largest |logit| {top:.1f}); same argmax at {agree:.1%}"
        )
    arms = ("float32", "float16", "bfloat16")
    for lr in ("1e-3", "1e-4"):  # the quickstart's, and one where the steps stay small
        lines += ["", f"lr {lr}:", "", "| step | " + " | ".join(arms) + " | fp16 / fp32 |"]
        lines.append("|---" * (len(arms) + 2) + "|")
        over = ("training.max_steps=5", "training.logging_steps=1", f"training.lr={lr}")
        with tempfile.TemporaryDirectory() as tmp:
            runs = {d: [r for r in train(d, Path(tmp) / d, *over) if "loss" in r] for d in arms}
        for rows in zip(*runs.values(), strict=True):
            losses = [r["loss"] for r in rows]
            cells = " | ".join(f"{x:.4f}" for x in losses)
            lines.append(f"| {rows[0]['step']} | {cells} | {losses[1] / losses[0]:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    which = sys.argv[1:] or ["auto", "fp16"]
    print(header())
    for name in which:
        print(f"\n### {name}\n\n" + {"auto": section_auto, "fp16": section_fp16}[name]())
