"""Benchmarks: gemma3-tune against transformers + peft, side by side, on this machine.

    python scripts/bench.py                     # every section, appended to BENCHMARKS.md
    python scripts/bench.py --sections lora --seq 2048 --no-append

Sections (each answers one question a user asks before choosing a toolkit):
  lora     LoRA step on the real Gemma 3 270M: seconds per step and peak RSS, ours vs
           transformers + peft, each in its own process on the same weights and tokens.
  compile  our 270M LoRA step with compiled decoder layers vs eager (training.compile).
  packing  real tokens / tokens computed: our packing vs naive padding vs TRL's pack_dataset.
  cache    image-heavy projector training with the vision-feature cache vs recomputing SigLIP.
  prep     preparing 100k and 1M chats: wall time, peak memory, cached restart; vs the old path.
  kv       KV-cache bytes at 8K/32K/128K for 4B/27B: 5 local : 1 global vs all global.
  distill  distillation step (teacher targets cached, or computed in the step) vs SFT step, on
           the 270M at 512/2048 tokens: time, peak memory, teacher fill tokens/s, cache bytes.
  dpo      one DPO step, ours vs TRL's DPOTrainer (--seq: tokens per pair)
  quant    GGUF files of the quickstart model (--quant-targets): size, held-out score in real
           llama.cpp, KL(f32 || file) per token.
  eval     the quickstart's 60 held-out chats scored by `gemma3-tune eval`, by the quickstart's
           previous scorer and by transformers' generate (needs runs/quickstart/merged).
  gpu      LoRA/QLoRA steps on 1B and 4B shapes up to 32K, ours vs transformers + peft (eager,
           + torch.compile, + Liger), fused linear-CE kernels, and tokens/s of real
           `gemma3-tune train` runs; CUDA only (scripts/bench_gpu.py). `--cases 1b-8k` runs one
           case; scripts/gpu_check.sh runs them one at a time, each with its own --budget.

Each measurement runs in a fresh subprocess (`python scripts/bench.py _worker ...`), so peak
RSS is that run's own and nothing is shared between ours and the baseline but the files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import sys
import time
from pathlib import Path

import bench_cache
import bench_cp
import bench_distill
import bench_eval
import bench_gpu
import bench_gpu_loss
import bench_kv
import bench_lora
import bench_packing
import bench_preference
import bench_prep
import bench_quant
import torch
from bench_harness import ROOT, machine  # bench_harness puts the repo on sys.path

# Each section lives in scripts/bench_<section>.py (compile beside lora, dpo in
# bench_preference.py); this file only parses the arguments and dispatches.
SECTIONS = {
    "lora": ("LoRA step on the real Gemma 3 270M", bench_lora.section_lora),
    "compile": ("Compiled decoder layers on CPU (270M LoRA step)", bench_lora.section_compile),
    "packing": ("Packing efficiency", bench_packing.section_packing),
    "cache": ("Vision-feature cache", bench_cache.section_cache),
    "kv": ("KV cache: 5 local : 1 global vs all global", bench_kv.section_kv),
    "gpu": ("GPU: LoRA and QLoRA steps, bf16, ours vs transformers + peft", bench_gpu.section_gpu),
    "prep": ("Data preparation at scale", bench_prep.section_prep),
    "eval": ("Held-out evaluation of the quickstart model", bench_eval.section_eval),
    "distill": ("Distillation: step time and memory vs SFT (270M)", bench_distill.section_distill),
    "quant": ("GGUF formats of the quickstart model in llama.cpp", bench_quant.section_quant),
    "dpo": ("DPO step: ours vs TRL's DPOTrainer (270M LoRA)", bench_preference.section_dpo),
    "cp": ("Context parallelism: bytes sent per step, by layer type", bench_cp.section_cp),
}


def worker(argv: list[str]) -> None:
    """`_worker KIND ARGS...`: one measurement in this fresh process (bench_harness.run_worker
    starts it); prints its result as one JSON line."""
    kind, rest = argv[0], argv[1:]
    if kind == "lora":
        impl, model_dir, seq, dtype, steps, labels = rest
        out = bench_lora.lora_worker(impl, model_dir, int(seq), dtype, int(steps), labels)
    elif kind == "cache":
        shape, mode, steps = rest
        out = bench_cache.cache_worker(shape, mode, int(steps))
    elif kind == "gpu":
        impl, case, steps, scratch, profile = rest
        out = bench_gpu.gpu_worker(impl, case, int(steps), scratch, profile == "1")
    elif kind == "prep":
        out = bench_prep.prep_worker(*rest)
    elif kind == "eval":
        out = bench_eval.eval_worker(*rest)
    elif kind == "quant-kl":
        out = bench_quant.quant_kl_worker(*rest)
    elif kind == "distill-fill":
        model_dir, seq, samples, out_path = rest
        out = bench_distill.distill_fill_worker(model_dir, int(seq), int(samples), out_path)
    elif kind == "distill":
        impl, model_dir, seq, samples, targets = rest
        out = bench_distill.distill_worker(impl, model_dir, int(seq), int(samples), targets)
    elif kind == "dpo":
        impl, model_dir, pair_path, steps = rest
        out = bench_preference.dpo_worker(impl, model_dir, pair_path, int(steps))
    elif kind == "loss":
        impl, hidden, tokens, steps = rest
        out = bench_gpu_loss.loss_worker(impl, int(hidden), int(tokens), int(steps))
    else:
        raise SystemExit(f"unknown worker {kind}")
    print(json.dumps(out))


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def _gpu_cases(s: str) -> list[str]:
    known = [*bench_gpu.GPU_CASES, *bench_gpu.GPU_EXTRA]
    names = [x for x in s.split(",") if x]
    unknown = [x for x in names if x not in known]
    if unknown:
        choices = ", ".join(known)
        raise argparse.ArgumentTypeError(f"unknown case {unknown[0]!r}; choose from {choices}")
    return names


def _gpu_impls(s: str) -> list[str]:
    names = [x for x in s.split(",") if x]
    if unknown := [x for x in names if x not in bench_gpu.GPU_IMPLS]:
        raise argparse.ArgumentTypeError(
            f"unknown side {unknown[0]!r}; choose from {', '.join(bench_gpu.GPU_IMPLS)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cp-row", type=int, default=8192, help="cp: tokens in the memory row")
    p.add_argument("--sections", default="lora,packing,cache,kv,gpu")
    p.add_argument("--seq", type=_ints, default=[512, 2048, 4096], help="section lora")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp32", "bf16"])
    p.add_argument("--labels", type=lambda s: s.split(","), default=["assistant", "all"])
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--packing-samples", type=int, default=20000)
    p.add_argument(
        "--eval-model", default=str(ROOT / "runs/quickstart/merged"), help="section eval"
    )
    p.add_argument("--packing-seq", type=_ints, default=[2048, 4096])
    p.add_argument(
        "--gpu-cases",
        "--cases",
        type=_gpu_cases,
        default="1b-8k,4b-8k,4b-4k-qlora,1b-16x512,1b-32k-gc,loss,cli",
        help="section gpu, comma-separated, in order (scripts/bench_gpu.py: GPU_CASES, loss, cli)",
    )
    p.add_argument(
        "--impls",
        type=_gpu_impls,
        default="ours,hf,hf-compile,hf-liger",
        help="section gpu: the sides of each case, in order (ours, hf, hf-compile, hf-liger)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="section gpu: seconds for a case, shared equally by its sides (default: no limit)",
    )
    p.add_argument("--profile", action="store_true", help="section gpu: profile one step per side")
    p.add_argument(
        "--no-notes", dest="notes", action="store_false", help="section gpu: tables only"
    )
    p.add_argument(
        "--gpu-cli-steps", type=int, default=30, help="section gpu: steps of each CLI run (0: skip)"
    )
    p.add_argument("--prep-sizes", type=_ints, default=[100000, 1000000], help="section prep")
    p.add_argument(
        "--prep-old-max",
        type=int,
        default=100000,
        help="section prep: largest size for the old path",
    )
    p.add_argument(
        "--quant-targets",
        type=lambda s: [x for x in s.split(",") if x],
        default=[],
        help="section quant: LABEL=FILE.gguf,... (scored in llama.cpp, KL to --eval-model)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--no-append", action="store_true", help="print only")
    return p


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        return worker(sys.argv[2:])
    # `timeout` (scripts/gpu_check.sh) stops a run with SIGTERM: exit through Python, so the
    # temporary folders (a 4B checkpoint for QLoRA) are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = build_parser().parse_args()
    command = "python scripts/bench.py " + " ".join(sys.argv[1:])
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = []
    for name in args.sections.split(","):
        title, fn = SECTIONS[name]
        t = time.perf_counter()
        body = fn(args)
        parts.append(f"### {title}\n\n{body}\n")
        print(f"\n### {title} ({time.perf_counter() - t:.0f} s)\n\n{body}\n", flush=True)
    block = (
        f"\n## Run of {stamp}\n\nCommand: `{command.strip()}`  \nMachine: {machine()}; torch"
        f" {torch.__version__}, {torch.get_num_threads()} threads.\n\n" + "\n".join(parts)
    )
    if not args.no_append:
        with args.out.open("a") as f:
            f.write(block)
        print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
