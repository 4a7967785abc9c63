"""Benchmark sections `lora` and `compile`: one LoRA step on the real Gemma 3 270M.

    python scripts/bench.py --sections lora --seq 2048,4096 --dtypes fp32 --labels assistant,all
    python scripts/bench.py --sections compile --seq 512,2048 --steps 3

`lora`: seconds per step and peak RSS, ours vs transformers + peft, each in its own process on
the same weights and tokens. `compile`: our step with compiled decoder layers vs eager
(training.compile). Both time `lora_worker` (`python scripts/bench.py _worker lora IMPL ...`).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from bench_harness import (
    LORA_TARGETS,
    chat_tokens,
    matmul_gflops,
    peak_rss_gib,
    run_worker,
    timed_steps,
)


def lora_worker(impl: str, model_dir: str, seq: int, dtype: str, steps: int, labels: str) -> dict:
    """One process: load the model, add LoRA r=16 on every decoder linear, time AdamW steps."""
    import peft

    torch.manual_seed(0)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    ids, lab = chat_tokens(Path(model_dir), seq)
    input_ids = torch.tensor([ids])
    label_t = torch.tensor([ids if labels == "all" else lab])
    cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS)
    if impl in ("ours", "ours-compiled"):
        from gemma3_tune.model.checkpoint import load_model
        from gemma3_tune.train.adapters import target_regex

        model = load_model(model_dir, dtype=torch_dtype, attn_backend="sdpa")
        cfg.target_modules = target_regex("all-linear")
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch_dtype, attn_implementation="sdpa"
        )
    model = peft.get_peft_model(model, cfg)
    if impl == "ours-compiled":
        model.get_base_model().compile_layers()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses: list[float] = []

    def step() -> None:
        # as the Trainer runs a bf16 step (precision.py), on both sides: base weights bf16, LoRA
        # weights fp32 (peft's default), the step under autocast so LoRA matmuls run in bf16 too
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model(input_ids=input_ids, labels=label_t)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())

    t0 = time.perf_counter()
    times = timed_steps(step, steps)
    return {
        "first_step_s": time.perf_counter() - t0 - sum(times),  # warm-up, compile included
        "step_s": statistics.median(times),
        "peak_gib": peak_rss_gib(),
        "first_loss": losses[0],
        "labelled": sum(x != -100 for x in label_t[0].tolist()) / seq,
    }


def section_lora(args) -> str:
    from gemma3_tune.convert.embedded import embedded_model_dir

    model_dir = embedded_model_dir("gemma3-270m")
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    rows = [
        "| tokens | dtype | loss on | ours s/step | transformers+peft s/step | time ratio"
        " | ours peak RSS | baseline peak RSS | memory ratio | first loss (ours / baseline) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for dtype in args.dtypes:
        if dtype == "bf16" and bf16 < fp32 / 4:
            notes.append(
                f"bf16 not run: this CPU multiplies bf16 at {bf16:.1f} GFLOP/s against"
                f" {fp32:.0f} GFLOP/s in fp32 (no AVX512-BF16/AMX), so one 512-token step would"
                " take tens of minutes for either side. Rerun `--dtypes bf16` on a CPU with"
                " AMX or on a GPU."
            )
            continue
        for seq in args.seq:
            for labels in args.labels:
                common = [model_dir, str(seq), dtype, str(args.steps), labels]
                ours = run_worker(["lora", "ours", *common])
                base = run_worker(["lora", "hf", *common])
                print(f"lora {seq} {dtype} {labels}: ours {ours} | baseline {base}", flush=True)
                rows.append(_lora_row(seq, dtype, labels, ours, base))
    head = (
        f"LoRA r=16 on all decoder linears, AdamW, micro-batch 1, no gradient checkpointing;"
        " bf16: base weights bf16, LoRA weights fp32, the step under bf16 autocast (the"
        " Trainer's bf16 step) on both sides;"
        f" real Gemma 3 270M (`gguf:gemma3-270m`), {args.steps} timed steps after one warm-up"
        " (median). Both sides get the same token ids: quickstart-style chats rendered with"
        " the Gemma template; 'assistant' puts the loss on assistant tokens as chat SFT does,"
        " 'all' on every token. The baseline is `AutoModelForCausalLM.from_pretrained(...,"
        " attn_implementation='sdpa')` + `peft.get_peft_model`, in its own process. Peak RSS"
        " is the process's high-water mark, model loading included."
        f" Matmul probe: fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s."
    )
    return "\n".join([head, "", *rows, "", *notes])


def _lora_row(seq: int, dtype: str, labels: str, ours: dict, base: dict) -> str:
    def side(r: dict, key: str, fmt: str) -> str:
        return r["error"] if "error" in r else fmt.format(r[key])

    def ratio(key: str) -> str:
        return "" if "error" in ours or "error" in base else f"{ours[key] / base[key]:.2f}x"

    share = labels if "error" in ours else f"{labels} ({100 * ours['labelled']:.0f}%)"
    return (
        f"| {seq} | {dtype} | {share} | {side(ours, 'step_s', '{:.2f}')}"
        f" | {side(base, 'step_s', '{:.2f}')} | {ratio('step_s')}"
        f" | {side(ours, 'peak_gib', '{:.2f} GiB')} | {side(base, 'peak_gib', '{:.2f} GiB')}"
        f" | {ratio('peak_gib')} | {side(ours, 'first_loss', '{:.5f}')}"
        f" / {side(base, 'first_loss', '{:.5f}')} |"
    )


def section_compile(args) -> str:
    """Our LoRA step with each decoder layer compiled (inductor's C++ backend) vs eager."""
    from gemma3_tune.convert.embedded import embedded_model_dir

    model_dir = embedded_model_dir("gemma3-270m")
    rows = [
        "| tokens | eager s/step | compiled s/step | speed-up | compiled first step (compile)"
        " | eager peak RSS | compiled peak RSS | first loss eager / compiled |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seq in args.seq:
        common = [model_dir, str(seq), "fp32", str(args.steps), "assistant"]
        eager = run_worker(["lora", "ours", *common])
        comp = run_worker(["lora", "ours-compiled", *common])
        print(f"compile {seq}: eager {eager} | compiled {comp}", flush=True)
        if "error" in eager or "error" in comp:
            rows.append(f"| {seq} | {eager.get('error', '')} | {comp.get('error', '')} | | | | | |")
            continue
        rows.append(
            f"| {seq} | {eager['step_s']:.2f} | {comp['step_s']:.2f}"
            f" | {eager['step_s'] / comp['step_s']:.2f}x | {comp['first_step_s']:.1f} s"
            f" | {eager['peak_gib']:.2f} GiB | {comp['peak_gib']:.2f} GiB"
            f" | {eager['first_loss']:.5f} / {comp['first_loss']:.5f} |"
        )
    head = (
        "Our LoRA step on the real Gemma 3 270M (r=16, all decoder linears, fp32, AdamW, loss on"
        " assistant tokens), eager against `training.compile: true` (each decoder layer compiled"
        f" in place), each in its own process; {args.steps} timed steps after one warm-up"
        " (median). The compiled first step includes compilation with an empty inductor cache"
        " only on the first run on a machine (later runs reuse ~/.cache or /tmp)."
    )
    return "\n".join([head, "", *rows])
