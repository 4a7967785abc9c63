"""Benchmark section `gpu`: LoRA/QLoRA steps on 1B and 4B shapes up to 32K tokens, ours vs
transformers + peft, on one CUDA card.

    python scripts/bench.py --sections gpu --cases 1b-8k --impls ours,hf --profile --budget 130

Each side of a case runs in its own process (`python scripts/bench.py _worker gpu ...`), as the
trainer runs a step: base weights bf16, LoRA weights fp32 (peft's default, our fp32 masters),
the step under `torch.autocast("cuda", torch.bfloat16)`, AdamW. With `--profile` the same
process then profiles one more step and splits its GPU time into categories (`kernel_category`).
Running out of memory is a result (that side does not fit on the card): a labelled cell, never
a crash. scripts/gpu_check.sh runs one case per stage, each with its own ceiling.
The section's other tables, `--cases loss` and `--cases cli`, are in bench_gpu_loss.py and
bench_gpu_cli.py.
"""

from __future__ import annotations

import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import bench_gpu_cli
import bench_gpu_loss
import torch
from bench_harness import GIB, LORA_TARGETS, run_worker, timed_steps

# name: (preset, tokens per document, documents, gradient checkpointing, method)
GPU_CASES = {
    "1b-8k": ("1b", 8192, 1, False, "lora"),
    "1b-16x512": ("1b", 512, 16, False, "lora"),
    "4b-8k": ("4b", 8192, 1, False, "lora"),
    "1b-32k-gc": ("1b", 32768, 1, True, "lora"),
    "4b-4k-qlora": ("4b", 4096, 1, False, "qlora"),
}
# Tables of section gpu that are not a model case: the fused-loss kernels (bench_gpu_loss.py)
# and real CLI runs (bench_gpu_cli.py).
GPU_EXTRA = ("loss", "cli")
# Each side of a case, in its own process, in this order; the column header of each.
GPU_IMPLS = {
    "ours": "ours",
    "hf": "transformers + peft",
    "hf-compile": "+ torch.compile (each decoder layer)",
    "hf-liger": "+ Liger",
}


def _gpu_text_cfg(name: str):
    """The preset's decoder alone: the benchmark is text-only."""
    from gemma3_tune.model.config import preset

    cfg = preset(name)
    return cfg.replace(vision=None) if cfg.is_multimodal else cfg


def _hf_text_model(cfg, method: str, scratch: Path):
    """transformers' Gemma3ForCausalLM with our preset's shape, random bf16 weights, sdpa.
    QLoRA takes the NF4 settings ours uses (`gemma3_tune/train/qlora.py`), quantized from the
    same bf16 weights, so the two sides differ only in code, not in quantization. The bf16
    checkpoint QLoRA loads is written once per case in `scratch` and reused by each side."""
    import transformers

    from gemma3_tune.model.config import config_to_hf
    from gemma3_tune.train.qlora import hf_quantization_config

    hc = config_to_hf(cfg, "bfloat16")
    hc.pop("architectures")
    hcfg = transformers.Gemma3TextConfig(**hc)
    hcfg._attn_implementation = "sdpa"
    if method != "qlora":
        with torch.device("cuda"):
            return transformers.Gemma3ForCausalLM(hcfg).to(torch.bfloat16)
    # 4-bit needs from_pretrained: random bf16 weights saved once, loaded quantized by each side
    # (renamed when complete: a side killed while saving leaves no half checkpoint behind).
    ckpt, partial = scratch / "hf", scratch / "hf.partial"
    if not ckpt.exists():
        with torch.device("cuda"):
            transformers.Gemma3ForCausalLM(hcfg).to(torch.bfloat16).save_pretrained(partial)
        partial.rename(ckpt)
        torch.cuda.empty_cache()
    return transformers.AutoModelForCausalLM.from_pretrained(
        ckpt,
        dtype=torch.bfloat16,
        quantization_config=hf_quantization_config(torch.bfloat16),
        attn_implementation="sdpa",
        device_map={"": 0},
    )


def _apply_liger() -> str | None:
    """Liger's public Gemma 3 entry point with its defaults (RoPE, RMSNorm, GeGLU, fused linear
    cross-entropy), as `TrainingArguments(use_liger_kernel=True)` would: it patches
    transformers' Gemma 3 classes, so it runs before the model is built. Returns the reason
    when liger_kernel is not installed (the row then says so instead of failing)."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_gemma3_text
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "liger_kernel":
            raise
        return "not installed"
    apply_liger_kernel_to_gemma3_text()
    return None


def _gpu_model(impl: str, cfg, method: str, gc: bool, scratch: Path) -> torch.nn.Module:
    """One side's model with LoRA r=16 on every decoder linear, compiled where that side is."""
    import peft

    from gemma3_tune.model.gemma3 import Gemma3
    from gemma3_tune.train.adapters import quantize_decoder, target_regex

    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS)
    if impl == "ours":
        with torch.device("cuda"):
            model = Gemma3(cfg, attn_backend="flex").to(torch.bfloat16)
        if method == "qlora":
            quantize_decoder(model, torch.bfloat16)
        lora.target_modules = target_regex("all-linear")
    else:
        model = _hf_text_model(cfg, method, scratch)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, lora)
    if impl == "ours":
        model.get_base_model().compile_layers()
    elif impl == "hf-compile":  # regional, as ours: the LM head and the loss stay eager
        for layer in model.get_base_model().model.layers:
            layer.compile()
    return model


def _gpu_measure(impl: str, case: str, steps: int, scratch: Path, profile: bool) -> dict:
    from gemma3_tune.model.flops import train_step_flops

    name, doc, n_docs, gc, method = GPU_CASES[case]
    cfg = _gpu_text_cfg(name)
    if impl == "hf-liger" and (reason := _apply_liger()):
        return {"error": reason}
    torch.manual_seed(0)
    model = _gpu_model(impl, cfg, method, gc, scratch)
    if impl == "ours":  # one packed row; positions restart at each document
        ids = torch.randint(10, 200000, (1, doc * n_docs), device="cuda")
        kw = {"position_ids": torch.arange(doc, device="cuda").repeat(n_docs)[None]}
    else:  # one row per document: transformers leaks attention across packed documents
        ids = torch.randint(10, 200000, (n_docs, doc), device="cuda")
        kw = {}
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=True)  # the Trainer's adamw_torch_fused

    def step() -> None:
        # as the Trainer runs a bf16 step (precision.py): autocast, so the fp32 LoRA weights
        # multiply in bf16 like the frozen ones; without it every LoRA matmul would be fp32
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, **kw).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.synchronize()
    t = time.perf_counter()
    step()  # the first step: compilation and autotuning, reported on a line of its own
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    torch.cuda.reset_peak_memory_stats()
    s = statistics.median(timed_steps(step, steps, torch.cuda.synchronize))
    adapter = sum(p.numel() for p in trainable)
    out = {
        "first_step_s": first,
        "step_s": s,
        "tokens_s": doc * n_docs / s,
        "flops": train_step_flops(cfg, [doc] * n_docs, adapter_params=adapter),
        "peak_gib": torch.cuda.max_memory_allocated() / GIB,
    }
    if profile:
        try:
            out["profile_ms"] = profile_step(step, vocab=cfg.vocab_size)
        except Exception as e:  # noqa: BLE001 -- the timing above stands without the profile
            out["profile_ms"] = {"error": f"{type(e).__name__}: {str(e)[:150]}"}
    return out


# GPU time of a step, by what the kernels do. The LM head and loss are told apart by shape (an
# op with the vocabulary in an input's shape, and everything it calls), since their GEMMs and
# elementwise kernels are named like any other; the rest by kernel name.
CATEGORIES = ("GEMM", "attention", "LM head + loss", "elementwise + other", "idle / host")
_ATTENTION = re.compile(r"flex|attention|fmha|flash|sdpa|triton_tem", re.I)
_GEMM = re.compile(r"gemm|cutlass|xmma|cublas|nvjet|wgmma|splitk|sm\d+_.*_tn|_nt_|matmul", re.I)


def kernel_category(kernel: str, in_loss: bool) -> str:
    """One of CATEGORIES for a kernel name; `in_loss`: launched under an op of the LM head or
    loss. FlexAttention's kernels are Triton templates (`triton_tem_*`); with no max-autotune,
    the only templates a step of ours runs."""
    if in_loss:
        return "LM head + loss"
    if _ATTENTION.search(kernel):
        return "attention"
    if _GEMM.search(kernel):
        return "GEMM"
    return "elementwise + other"


def _touches_vocab(event, vocab: int) -> bool:
    """The op or one of its ancestors has an input with the vocabulary as a dimension."""
    while event is not None:
        if any(vocab in shape for shape in (event.input_shapes or []) if isinstance(shape, list)):
            return True
        event = event.cpu_parent
    return False


def categorize(events, wall_ms: float, vocab: int) -> dict[str, float]:
    """Milliseconds per category from profiler events (`prof.events()`): each CPU op's kernels
    (`event.kernels`, durations in us) by `kernel_category`; idle / host = the step's wall time
    minus the summed kernel time (one stream: kernels do not overlap)."""
    ms = dict.fromkeys(CATEGORIES, 0.0)
    for event in events:
        for k in getattr(event, "kernels", None) or []:
            ms[kernel_category(k.name, _touches_vocab(event, vocab))] += k.duration / 1000
    ms["idle / host"] = max(0.0, wall_ms - sum(ms.values()))
    return ms


def profile_step(step, vocab: int) -> dict[str, float]:
    """One more step under torch.profiler (shapes recorded), split by `categorize`."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True
    ) as prof:
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall_ms = 1000 * (time.perf_counter() - t)
    return categorize(prof.events(), wall_ms, vocab)


def _out_of_memory() -> dict:
    peak = torch.cuda.max_memory_allocated() / GIB
    total = torch.cuda.get_device_properties(0).total_memory / GIB
    return {"error": f"out of memory (peak before failing {peak:.1f} of {total:.0f} GiB)"}


def gpu_worker(impl: str, case: str, steps: int, scratch: str, profile: bool = False) -> dict:
    """One side of one case of GPU_CASES: random weights, LoRA r=16 on all decoder linears,
    bf16 autocast over fp32 LoRA weights (the Trainer's bf16 step), fused AdamW, loss on every
    token. Ours packs the documents into one row (FlexAttention,
    compiled layers); transformers gets one row per document. Running out of memory is a
    result (that side does not fit on this card), so it becomes a labelled cell, not a crash.
    `scratch`: a folder the sides of one case share (the QLoRA baseline's bf16 checkpoint)."""
    try:
        return _gpu_measure(impl, case, steps, Path(scratch), profile)
    except torch.cuda.OutOfMemoryError:
        return _out_of_memory()
    except RuntimeError as e:  # bitsandbytes and some kernels raise a plain RuntimeError
        if "out of memory" not in str(e).lower():
            raise
        return _out_of_memory()


def gpu_case_table(case: str, results: dict[str, dict], device: str, steps: int) -> str:
    """One case: a column per side that ran (`results`, in GPU_IMPLS order), a row per measure;
    the first step, where compilation happens, on its own row so it never hides in (or
    inflates) the throughput; then, where the sides were profiled, GPU ms per category."""
    from gemma3_tune.model.flops import peak_flops

    peak = peak_flops(device)
    name, doc, n_docs, gc, method = GPU_CASES[case]
    kind = {"lora": "LoRA r=16", "qlora": "QLoRA r=16"}[method]
    title = f"{case}: {name.upper()}, {n_docs} x {doc:,} tokens, {kind}"
    title += ", gradient checkpointing" if gc else ""
    sides = [impl for impl in GPU_IMPLS if impl in results]
    ours = results.get("ours", {"error": "not run"})

    def row(label: str, fmt, show_error: bool = False) -> str:
        """One measure across the sides; a failed side shows its reason once, in the first row."""
        cells = []
        for impl in sides:
            r = results[impl]
            cells.append(fmt(r) if "error" not in r else r["error"] if show_error else "")
        return f"| {label} | " + " | ".join(cells) + " |"

    def vs_ours(r: dict) -> str:
        return "" if "error" in ours else f"{r['tokens_s'] / ours['tokens_s']:.2f}x"

    mfu = (
        row("MFU", lambda r: f"{r['flops'] / r['step_s'] / peak:.1%}")
        if peak
        else f"| MFU: not computed, no dense bf16 peak known for {device}"
        " (gemma3_tune/model/flops.py) |" + " |" * len(sides)
    )
    lines = [
        f"| {title} | " + " | ".join(GPU_IMPLS[i] for i in sides) + " |",
        "|---" * (1 + len(sides)) + "|",
        row(f"tokens/s (median of {steps} steps)", lambda r: f"{r['tokens_s']:,.0f}", True),
        row("tokens/s vs ours", vs_ours),
        mfu,
        row("peak GiB (after the first step)", lambda r: f"{r['peak_gib']:.1f}"),
        row("first step s (compile + autotune)", lambda r: f"{r['first_step_s']:.1f}"),
    ]
    return "\n".join(lines + _profile_rows(results, sides))


def _profile_rows(results: dict[str, dict], sides: list[str]) -> list[str]:
    """GPU ms of one profiled step per category, for the sides that have a profile."""
    profiles = {i: results[i].get("profile_ms") for i in sides if "error" not in results[i]}
    if not any(profiles.values()):
        return []

    def cell(impl: str, cat: str) -> str:
        p = profiles.get(impl)
        if not p:
            return ""
        if "error" in p:
            return f"profile failed: {p['error']}" if cat == CATEGORIES[0] else ""
        return f"{p[cat]:.1f} ({p[cat] / sum(p.values()):.0%})"

    return [f"| profiled step, ms: {cat} | " + " | ".join(cell(i, cat) for i in sides) + " |"
            for cat in CATEGORIES]  # fmt: skip


def gpu_notes(steps: int, device: str, peak: float | None) -> str:
    """What every column of the case tables is, so a reader can rerun any of them."""
    from gemma3_tune.model.flops import peak_card

    mfu = (
        f"against the {peak / 1e12:.1f} TFLOP/s dense bf16 peak of the {peak_card(device)}"
        if peak
        else f"not computed: no published dense bf16 peak for {device!r} in the table of"
        " `gemma3_tune/model/flops.py`"
    )
    return (
        "Random weights of the preset's shape (4B: its decoder alone), LoRA r=16 on all decoder"
        " linears, base weights bf16 and LoRA weights fp32 with the step under bf16 autocast (as"
        " the Trainer runs a bf16 step, on both sides), fused AdamW, loss on every token. ours: FlexAttention, each decoder layer"
        " compiled (`compile_layers`), the documents packed in one row. transformers + peft:"
        " `Gemma3ForCausalLM` (sdpa), one row per document (it leaks attention across packed"
        " documents), eager; '+ torch.compile': the same with each decoder layer compiled in"
        " place (`layer.compile()`, regional like ours; LM head and loss eager); '+ Liger': the"
        " same with `liger_kernel.transformers.apply_liger_kernel_to_gemma3_text()` (its"
        " defaults: RoPE, RMSNorm, GeGLU, fused linear cross-entropy) applied before the model"
        " is built, 'not installed' where liger_kernel is absent. QLoRA: the same bitsandbytes"
        " NF4 settings on both sides (double quantization, bf16 compute, quantized from bf16"
        " weights: `gemma3_tune/train/qlora.py`, transformers through its"
        " `hf_quantization_config`), no `prepare_model_for_kbit_training` on either. Every side"
        " runs in its own process. The first step (compilation and autotuning) is timed on its"
        f" own row; then one more warm-up step and the median of {steps} timed steps. Peak GiB:"
        " `torch.cuda.max_memory_allocated` after the first step; a side that does not fit says"
        " 'out of memory' with its peak before failing. MFU counts the same FLOPs for every"
        " column (4 per frozen weight and token, 6 per LoRA weight, attention over visible keys"
        f" only: `gemma3_tune/model/flops.py`), {mfu}. 'profiled step': one more step under"
        " torch.profiler, GPU kernel time by category (`kernel_category` in scripts/bench_gpu.py:"
        " ops with the vocabulary in an input's shape are the LM head + loss; idle / host is the"
        f" step's wall time minus its kernel time). Card: {device}."
    )


SIDE_MIN_S = 30  # kept for each side still to run: loading and 7 eager steps, or its OOM


def gpu_case(case: str, args) -> dict[str, dict]:
    """Each side of a case in its own process, in order, printed as each finishes (a run cut
    short keeps them). With --budget, a side may take what is left of it less SIDE_MIN_S for
    each side after it: ours goes first and gets most of it, for its cold compilation."""
    deadline = time.monotonic() + args.budget - 10 if args.budget else None
    results = {}
    with tempfile.TemporaryDirectory(prefix=f"bench-{case}-") as scratch:
        for i, impl in enumerate(args.impls):
            timeout = None
            if deadline is not None:
                after = len(args.impls) - 1 - i
                timeout = max(10.0, deadline - time.monotonic() - SIDE_MIN_S * after)
            cmd = ["gpu", impl, case, str(args.steps), scratch, str(int(args.profile))]
            results[impl] = run_worker(cmd, timeout=timeout)
            print(f"gpu {case} {impl}: {json.dumps(results[impl])}", flush=True)
    return results


def section_gpu(args) -> str:
    if not torch.cuda.is_available():
        return "Not run: no CUDA device on this machine."
    from gemma3_tune.model.flops import peak_flops

    device = torch.cuda.get_device_name(0)
    peak = peak_flops(device)
    tables = []
    for case in args.gpu_cases:
        if case == "loss":
            tables.append("\n".join(bench_gpu_loss.gpu_loss_rows(args)))
        elif case == "cli" and args.gpu_cli_steps:
            head = ["| run | tokens/s | | | peak GiB |", "|---|---|---|---|---|"]
            tables.append("\n".join(head + bench_gpu_cli.gpu_cli_rows(args)))
        elif case in GPU_CASES:
            results = gpu_case(case, args)
            tables.append(gpu_case_table(case, results, device, args.steps))
    notes = gpu_notes(args.steps, device, peak) + "\n\n" if args.notes else ""
    return notes + "\n\n".join(tables)
