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
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_harness import (  # noqa: E402  (bench_harness puts the repo on sys.path)
    GIB,
    LORA_TARGETS,
    ROOT,
    chat_lengths,
    machine,
    matmul_gflops,
    peak_rss_gib,
    process_tree,
    run_worker,
    student,
    timed_steps,
)

# ---------------------------------------------------------------------------------------------
# Section 1: LoRA step on the real 270M


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


# ---------------------------------------------------------------------------------------------
# Section 2: packing efficiency


def section_packing(args) -> str:
    import datasets
    from trl.data_utils import pack_dataset

    from gemma3_tune.data.packing import pack

    lengths = chat_lengths(args.packing_samples)
    rows = [
        "| max_seq_len | method | rows (batches for micro-batch 8) | tokens computed | real tokens"
        " kept | efficiency | tokens cut |",
        "|---|---|---|---|---|---|---|",
    ]
    total = sum(lengths)
    for cap in args.packing_seq:
        fits = [n for n in lengths if n <= cap]
        long_ = [n for n in lengths if n > cap]
        # Ours: samples that fit are packed whole; longer ones are truncated (data.truncation:
        # drop would count and skip them), so each is one more cut sample.
        ours_rows = pack(fits + [cap] * len(long_), cap, seed=0)
        kept = sum(fits) + cap * len(long_)
        results = {"gemma3-tune (BFD, whole samples)": (len(ours_rows), len(ours_rows) * cap, kept)}
        # Naive: one sample per row, padded to max_seq_len (padding="max_length").
        results["naive, pad to max_seq_len"] = (len(lengths), len(lengths) * cap, kept)
        # Naive: micro-batch 8 in random order, padded to the longest in the batch.
        rng = random.Random(0)
        order = [min(n, cap) for n in lengths]
        rng.shuffle(order)
        batched = sum(8 * max(order[i : i + 8]) for i in range(0, len(order), 8))
        results["naive, micro-batch 8, pad to longest"] = (len(order) // 8, batched, kept)
        ds = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})
        for strategy in ("bfd", "wrapped"):
            packed = pack_dataset(ds, cap, strategy=strategy)
            lens = [len(x) for x in packed["input_ids"]]
            results[f"TRL pack_dataset({strategy!r})"] = (len(lens), len(lens) * cap, sum(lens))
        for name, (n_rows, computed, real) in results.items():
            cut = total - real
            rows.append(
                f"| {cap} | {name} | {n_rows:,} | {computed:,} | {real:,} |"
                f" {100 * real / computed:.1f}% | {cut:,} ({100 * cut / total:.1f}%) |"
            )
    head = (
        f"{len(lengths):,} chats, {total:,} tokens, lengths log-normal (median 350, mean"
        f" {total // len(lengths)}, max {max(lengths)}). Efficiency = real tokens / tokens"
        " computed, where a packed row costs max_seq_len tokens. 'tokens cut' are tokens lost"
        " to truncation: TRL's 'wrapped' cuts chats in the middle across rows (it loses nothing"
        " but splits conversations); TRL's 'bfd' truncates long chats and drops the rest."
    )
    return "\n".join([head, "", *rows])


# ---------------------------------------------------------------------------------------------
# Section 3: vision-feature cache


def cache_worker(shape: str, mode: str, steps: int) -> dict:
    """Projector-only training on image-only rows: pixels through the frozen tower every step
    (`recompute`) or features from the cache (`cache`, filled before timing)."""
    from PIL import Image

    from gemma3_tune.data.collate import Collator, concat_row
    from gemma3_tune.data.dataset import vision_tokens
    from gemma3_tune.data.feature_cache import FeatureCache, weights_fingerprint
    from gemma3_tune.data.images import preprocess
    from gemma3_tune.data.template import ImageRef, Turn, render
    from gemma3_tune.data.tokenizer import Tokenizer, train_tiny_tokenizer
    from gemma3_tune.model.config import VisionConfig, preset
    from gemma3_tune.model.gemma3 import Gemma3
    from gemma3_tune.model.init import random_init

    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    ids = train_tiny_tokenizer(tmp, vocab_size=512, seed=0)
    cfg = preset("tiny-vision").replace(
        vocab_size=512,
        image_token_id=ids["<image_soft_token>"],
        boi_token_id=ids["<start_of_image>"],
        eoi_token_id=ids["<end_of_image>"],
    )
    if shape == "4b-siglip-2l":  # the 4B's SigLIP so400m/14 at 896 px, 2 of its 27 layers
        cfg = cfg.replace(vision=VisionConfig(num_hidden_layers=2), mm_tokens_per_image=256)
    model = random_init(Gemma3(cfg), 0)
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    model.train()
    tok = Tokenizer(tmp)
    images = []
    for i in range(4):  # four images per row: an image-heavy caption/VQA batch
        p = tmp / f"img{i}.png"
        Image.new("RGB", (320 + 40 * i, 240), (40 * i, 90, 200 - 30 * i)).save(p)
        images.append(ImageRef(str(p)))
    turns = [
        Turn("user", [*images, "Describe the images."]),
        Turn("assistant", ["Four flat colour fields, blue to red."]),
    ]
    row = concat_row([render(turns, tok, vision_tokens(cfg))])
    row["image_refs"] = [{"path": im.path, "views": im.views} for im in row["image_refs"]]
    size = cfg.vision.image_size
    if mode == "cache":
        cache = FeatureCache(
            tmp / "cache",
            lambda px: model.vision_features(px).float(),
            weights_fingerprint(model.vision_tower),
            size,
        )
        collate = Collator(
            tok.pad_id, lambda im: cache.features(ImageRef(im["path"])), "vision_features"
        )
        collate([row])  # fill the cache: a cost paid once per image for the whole run
    else:
        collate = Collator(tok.pad_id, lambda im: preprocess(im["path"], size), "pixel_values")
    opt = torch.optim.AdamW(model.projector.parameters(), lr=1e-4)

    def step() -> None:
        batch = collate([row])
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = timed_steps(step, steps)
    return {"step_s": statistics.median(times), "peak_gib": peak_rss_gib()}


def section_cache(args) -> str:
    rows = [
        "| vision tower | recompute SigLIP s/step | feature cache s/step | speed-up |",
        "|---|---|---|---|",
    ]
    for shape, label in (
        ("tiny-vision", "tiny-vision (64 px, 2 layers)"),
        ("4b-siglip-2l", "4B SigLIP so400m/14, 896 px, 2 of 27 layers"),
    ):
        slow = run_worker(["cache", shape, "recompute", str(args.steps)])
        fast = run_worker(["cache", shape, "cache", str(args.steps)])
        print(f"cache {shape}: recompute {slow} | cache {fast}", flush=True)
        if "error" in slow or "error" in fast:
            rows.append(f"| {label} | {slow.get('error', '')} | {fast.get('error', '')} | |")
            continue
        rows.append(
            f"| {label} | {slow['step_s']:.3f} | {fast['step_s']:.3f}"
            f" | {slow['step_s'] / fast['step_s']:.1f}x |"
        )
    head = (
        "Projector-only training (`method: none`, `train_projector: true`), one row of four"
        " images and a short caption, tiny decoder, AdamW; the step includes collation (image"
        " decoding + preprocessing, or reading cached features). Not measured here: with all 27"
        " layers the recompute column would grow with the layer count (about 13x) while the"
        " cached one would not change."
    )
    return "\n".join([head, "", *rows])


# ---------------------------------------------------------------------------------------------
# Section 4: KV cache


def section_kv(args) -> str:
    from gemma3_tune.export.generate_cli import cache_table

    return (
        "Formula over the published configs (K and V, bf16, one sequence; sliding layers hold"
        " `sliding_window` positions), checked against a hand count in tests/test_generate.py.\n\n"
        + cache_table()
    )


# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# Section: data preparation at scale


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


def prep_worker(data: str, model_dir: str, words: str) -> dict:
    """The in-memory path, dataset.build, in one process, no cache: with words="whole", text
    is tokenized whole, as every run did before the prepared-data cache (the path this
    benchmark compares against); with words="memo", with today's memoised word-by-word
    encoding (same ids), to show what each change gives."""
    from gemma3_tune.data.dataset import DataConfig, build
    from gemma3_tune.data.tokenizer import Tokenizer
    from gemma3_tune.model.checkpoint import read_config

    tok = Tokenizer(model_dir)
    if words == "whole":
        tok._words = None
    dc = DataConfig(train=[data], max_seq_len=2048)
    d = build(dc, tok, read_config(model_dir), Path("."), 42)
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
            for words, label in (
                ("whole", "before: in-memory `dataset.build`, whole-text tokenization"),
                ("memo", "in-memory `dataset.build` with the word memo (no parallelism, no cache)"),
            ):
                if n > args.prep_old_max:
                    continue
                worker = [sys.executable, str(Path(__file__).resolve()), "_worker", "prep"]
                old = timed_tree([*worker, str(data), model_dir, words])
                print(f"prep {n}: {words} {old}", flush=True)
                cell = old.get("error") or f"{old['wall_s']:.1f} s"
                ratio = (
                    ""
                    if "error" in old
                    else f" ({old['wall_s'] / new['wall_s']:.1f}x the new time)"
                )
                peak = "" if "error" in old else f"{old['peak_gib']:.2f} GiB"
                rows.append(f"| {n:,} | | {label} | {cell}{ratio} | {peak} | none (no cache) |")
            shutil.rmtree(t / "cache", ignore_errors=True)
            data.unlink()
    return (
        "Synthetic chats from `scripts/make_synthetic_chats.py` (seed 0: log-normal lengths,"
        " 1-3 exchanges, some system prompts), the real Gemma 3 270M tokenizer, max_seq_len"
        f" 2048, packing on, {os.cpu_count()} worker processes. Wall time includes the CLI's"
        f" start-up (`gemma3-tune --help` alone: {help_s:.1f} s). Peak memory sums the PSS of the"
        " main process and its workers, sampled every 0.2 s (a page shared by k processes counts"
        " 1/k in each; an RSS sum would count the forked workers' shared pages k times). 'before' is the path every run took until now (one process, whole-text"
        " tokenization into Python lists, no cache), in the same run.\n\n" + "\n".join(rows)
    )


# ---------------------------------------------------------------------------------------------
# Section: held-out evaluation (gemma3-tune eval)

EVAL_NEW_TOKENS, EVAL_BATCH = 40, 30  # the quickstart's


def eval_worker(impl: str, model_dir: str, data: str) -> dict:
    """Greedy replies to the held-out chats and their json score: `gemma3-tune eval`'s path,
    the quickstart's previous scorer (its own prompt building around generate_batch), or
    transformers' generate (left-padded batches, the folder's chat template), the same model,
    batch size and reply length."""
    from gemma3_tune.eval.metrics import json_equal

    rows = [json.loads(x) for x in Path(data).read_text().splitlines()]
    refs = [r["messages"][-1]["content"] for r in rows]
    t0 = time.perf_counter()
    if impl == "ours":
        from gemma3_tune.eval.runner import load_samples, replies
        from gemma3_tune.eval.targets import load_target, parse_target

        model, tok = load_target(parse_target(model_dir), "cpu", torch.float32)
        samples = load_samples(data, None)
        t1 = time.perf_counter()

        class _NoBar:
            def update(self, n: int) -> None:
                pass

        texts = replies(model, tok, samples, EVAL_NEW_TOKENS, EVAL_BATCH, _NoBar())
    elif impl == "previous":
        from gemma3_tune.data.tokenizer import Tokenizer
        from gemma3_tune.export.inference import chat_ids, load_with_adapter
        from gemma3_tune.model.generate import generate_batch

        model, tok = load_with_adapter(Path(model_dir), None).eval(), Tokenizer(model_dir)
        t1 = time.perf_counter()
        ids = [chat_ids(tok, model, r["messages"][0]["content"])[0][0].tolist() for r in rows]
        texts = []
        with torch.no_grad():
            for i in range(0, len(ids), EVAL_BATCH):
                out = generate_batch(
                    model, ids[i : i + EVAL_BATCH], max_new_tokens=EVAL_NEW_TOKENS,
                    stop_ids={tok.end_of_turn, tok.eos_id}, pad_id=tok.pad_id,
                )  # fmt: skip
                texts += [tok.decode(o) for o in out]
    else:
        import transformers

        hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="sdpa"
        ).eval()
        t1 = time.perf_counter()
        end = hf_tok.convert_tokens_to_ids("<end_of_turn>")
        texts = []
        with torch.no_grad():
            for i in range(0, len(rows), EVAL_BATCH):
                prompts = [
                    hf_tok.apply_chat_template(
                        r["messages"][:-1], tokenize=False, add_generation_prompt=True
                    )
                    for r in rows[i : i + EVAL_BATCH]
                ]
                enc = hf_tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
                out = model.generate(
                    **enc, max_new_tokens=EVAL_NEW_TOKENS, do_sample=False,
                    eos_token_id=[end, hf_tok.eos_token_id], pad_token_id=hf_tok.pad_token_id,
                )  # fmt: skip
                new = out[:, enc["input_ids"].shape[1] :]
                texts += [hf_tok.decode(t, skip_special_tokens=True) for t in new]
    t2 = time.perf_counter()
    score = sum(json_equal(t, r) for t, r in zip(texts, refs, strict=True)) / len(refs)
    return {"load_s": t1 - t0, "decode_s": t2 - t1, "score": score, "replies": texts}


def section_eval(args) -> str:
    model_dir = args.eval_model
    if not (Path(model_dir) / "config.json").is_file():
        return f"not run: {model_dir} is missing (scripts/quickstart.sh writes it)"
    data = str(ROOT / "data/quickstart/eval.jsonl")
    res = {
        impl: run_worker(["eval", impl, model_dir, data])
        for impl in ("ours", "previous", "transformers")
    }
    ours = res["ours"].get("replies")
    rows = [
        "| scorer | model load | decoding 60 replies | json exact | replies equal to ours |",
        "|---|---|---|---|---|",
    ]
    names = {"ours": "`gemma3-tune eval` (batched KV cache)", "previous": "the quickstart's previous scorer",
             "transformers": "transformers `generate` (left-padded batches)"}  # fmt: skip
    for impl, r in res.items():
        if "error" in r:
            rows.append(f"| {names[impl]} | {r['error']} | | | |")
            continue
        same = sum(a == b for a, b in zip(r["replies"], ours or [], strict=False))
        rows.append(
            f"| {names[impl]} | {r['load_s']:.1f} s | {r['decode_s']:.1f} s | {100 * r['score']:.0f}%"
            f" | {same}/{len(r['replies'])} |"
        )
    return (
        f"The quickstart's 60 held-out chats, greedy, at most {EVAL_NEW_TOKENS} new tokens,"
        f" {EVAL_BATCH} prompts per batch, fp32, on `{model_dir}` (the quickstart's merged model),"
        " each scorer in its own process.\n\n" + "\n".join(rows)
    )


# ---------------------------------------------------------------------------------------------
# Section distill: distillation step vs SFT step (270M LoRA), teacher fill


def _teacher_targets(teacher, ids, labels, samples: int):
    """What the cache holds for one row: (ids, weights, token) of every scored token."""
    from gemma3_tune.model.loss import teacher_targets
    from gemma3_tune.train.objectives.distill import scored

    with torch.no_grad():
        h = teacher(ids, hidden_only=True).hidden[0]  # [T, D]
        keep = scored(labels[0])
        g = torch.Generator().manual_seed(0)
        w = teacher.get_output_embeddings().weight
        return teacher_targets(h.index_select(0, keep), w, samples, "sampled", 1.0, g)


def distill_fill_worker(model_dir: str, seq: int, samples: int, out: str) -> dict:
    """The teacher's cache fill for one row: forward + sampling, tokens/s, bytes per token."""
    from gemma3_tune.model.checkpoint import load_model

    teacher = load_model(model_dir, dtype=torch.float32, attn_backend="sdpa").eval()
    ids, lab = chat_tokens(Path(model_dir), seq)
    ids_t, lab_t = torch.tensor([ids]), torch.tensor([lab])
    result: list = []
    times = timed_steps(lambda: result.append(_teacher_targets(teacher, ids_t, lab_t, samples)), 3)
    t_ids, t_w, t_tok = result[-1]
    n = int(t_tok.max()) + 1
    torch.save({"ids": t_ids, "weights": t_w, "token": t_tok}, out)
    entries = len(t_ids) / n
    return {
        "tokens_per_s": n / statistics.median(times),
        "scored": n,
        "entries_per_token": entries,
        "bytes_per_token": 8 * entries + 8,  # ids int32 + weights fp32, + one int64 offset
    }


def distill_worker(impl: str, model_dir: str, seq: int, samples: int, targets: str) -> dict:
    """One LoRA step of the 270M student: SFT, distillation from cached targets, or with the
    teacher (a second 270M) run in the step."""
    from gemma3_tune.model.loss import SoftTargets

    ids, lab = chat_tokens(Path(model_dir), seq)
    ids_t, lab_t = torch.tensor([ids]), torch.tensor([lab])
    teacher = None
    if impl == "step":
        from gemma3_tune.model.checkpoint import load_model

        teacher = load_model(model_dir, dtype=torch.float32, attn_backend="sdpa").eval()
    model = student(model_dir)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cached = torch.load(targets) if impl == "cache" else None

    def step() -> None:
        kw = {}
        if impl == "cache":
            kw["soft_targets"] = SoftTargets(cached["ids"], cached["weights"], cached["token"])
        elif impl == "step":
            kw["soft_targets"] = SoftTargets(*_teacher_targets(teacher, ids_t, lab_t, samples))
        out = model(input_ids=ids_t, labels=lab_t, **kw)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = timed_steps(step, 3)
    hwm = next(
        int(x.split()[1]) / 2**20 for x in open("/proc/self/status") if x.startswith("VmHWM")
    )
    return {"step_s": statistics.median(times), "peak_gib": hwm}


def section_distill(args) -> str:
    from gemma3_tune.convert.embedded import embedded_model_dir

    model_dir = str(embedded_model_dir("gemma3-270m"))
    samples = 256
    rows = [
        "| tokens | scored | SFT s/step | distill, cache s/step | distill, in step s/step"
        " | SFT peak | cache peak | in-step peak | teacher fill tokens/s | cache bytes/token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # a fixed threshold: peaks comparable run to run
    os.environ.update(env)
    with tempfile.TemporaryDirectory() as tmp:
        for seq in args.seq:
            targets = str(Path(tmp) / f"targets-{seq}.pt")
            fill = run_worker(["distill-fill", model_dir, str(seq), str(samples), targets])
            res = {
                impl: run_worker(["distill", impl, model_dir, str(seq), str(samples), targets])
                for impl in ("sft", "cache", "step")
            }
            print(f"distill {seq}: fill {fill} | {res}", flush=True)

            def cell(r: dict, key: str, fmt: str, base: dict | None = None) -> str:
                if "error" in r:
                    return r["error"]
                out = fmt.format(r[key])
                if base is not None and "error" not in base:
                    out += f" ({r[key] / base[key]:.2f}x)"
                return out

            sft = res["sft"]
            rows.append(
                f"| {seq} | {fill.get('scored', '?')} | {cell(sft, 'step_s', '{:.2f}')}"
                f" | {cell(res['cache'], 'step_s', '{:.2f}', sft)}"
                f" | {cell(res['step'], 'step_s', '{:.2f}', sft)}"
                f" | {cell(sft, 'peak_gib', '{:.2f} GiB')}"
                f" | {cell(res['cache'], 'peak_gib', '{:.2f} GiB', sft)}"
                f" | {cell(res['step'], 'peak_gib', '{:.2f} GiB', sft)}"
                f" | {cell(fill, 'tokens_per_s', '{:,.0f}')}"
                f" | {cell(fill, 'bytes_per_token', '{:,.0f}')}"
                f" ({fill.get('entries_per_token', 0):.0f} ids) |"
            )
    head = (
        "Distillation on this machine: the real Gemma 3 270M (`gguf:gemma3-270m`) as student"
        " (LoRA r=16 on every decoder linear, fp32, AdamW, micro-batch 1) and as teacher,"
        f" {samples} sampled ids per scored token (the report's setting), quickstart-style chats"
        " with the loss on assistant tokens. SFT: the labels' chunked cross-entropy; cache: the"
        " distillation loss on targets the teacher computed beforehand (another process, as"
        " `distill.cache: true` does before the student loads); in step: the teacher's forward"
        " and sampling inside every step (`distill.cache: false`). Median of 3 steps after a"
        " warm-up, each side in its own process; peak is VmHWM with glibc's mmap threshold"
        " fixed (64 KiB), model loading included. Teacher fill: forward + sampling of one row,"
        " scored tokens per second. Bytes per token: 8 per (id, weight) entry + an 8-byte"
        " offset; a teacher draws its likely ids repeatedly, so a token has fewer entries"
        f" than {samples} draws."
    )
    return "\n".join([head, "", *rows])


# ---------------------------------------------------------------------------------------------
# Section quant: GGUF formats of the quickstart model, scored in real llama.cpp


def quant_kl_worker(reference: str, gguf: str, data: str) -> dict:
    """KL(reference || GGUF) per token over the held-out chats, full vocabulary: the GGUF's
    weights exactly (de-quantized into our model), the reference in fp32."""
    from gemma3_tune.data.template import Turn, render
    from gemma3_tune.data.tokenizer import Tokenizer
    from gemma3_tune.eval.targets import load_target, parse_target

    ref, tok = load_target(parse_target(reference), "cpu", torch.float32)
    q, _ = load_target(parse_target(gguf), "cpu", torch.float32)
    del tok
    tok = Tokenizer(reference)
    total, n, reply, n_reply = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for line in Path(data).read_text().splitlines():
            msgs = json.loads(line)["messages"]
            sample = render([Turn(m["role"], [m["content"]]) for m in msgs], tok, None)
            ids = torch.tensor([sample.input_ids])
            lp = torch.log_softmax(ref(ids).logits[0].float(), -1)  # [T, V]
            lq = torch.log_softmax(q(ids).logits[0].float(), -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)  # [T]
            # Position t predicts token t+1: the reply positions are those whose next token is
            # labelled (the assistant's tokens and its <end_of_turn>).
            scored = torch.tensor(sample.labels[1:] + [-100]) != -100  # [T]
            total += kl.sum().item()
            n += ids.shape[1]
            reply += kl[scored].sum().item()
            n_reply += int(scored.sum())
    return {"kl": total / n, "tokens": n, "kl_reply": reply / n_reply, "reply_tokens": n_reply}


def section_quant(args) -> str:
    """`--quant-targets LABEL=FILE.gguf,...` (and `--eval-model` as the f32 reference): size,
    held-out JSON exact match in real llama.cpp (`gemma3-tune eval --backend llama.cpp`) and
    KL(f32 || file) per token."""
    data = str(ROOT / "data/quickstart/eval.jsonl")
    reference = args.eval_model
    rows = [
        "| file | format | size | json exact (llama.cpp, 60 held out)"
        " | KL(f32 \\|\\| file) per token, whole chats | KL per reply token |",
        "|---|---|---|---|---|---|",
    ]
    for item in args.quant_targets:
        label, path = item.split("=", 1)
        cmd = [sys.executable, "-m", "gemma3_tune", "eval", path, "--data", data, "--metric",
               "json", "--backend", "llama.cpp", "--json"]  # fmt: skip
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        try:
            score = json.loads(proc.stdout.strip().splitlines()[-1])["scores"][path]
            score_txt = f"{100 * score:.1f}%"
        except (IndexError, KeyError, json.JSONDecodeError):
            score_txt = f"failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
        kl = run_worker(["quant-kl", reference, path, data])
        kl_txt = kl["error"] if "error" in kl else f"{kl['kl']:.4f} | {kl['kl_reply']:.4f}"
        size = Path(path).stat().st_size / 2**20
        print(f"quant {label}: {score_txt}, KL {kl_txt}, {size:.1f} MiB", flush=True)
        rows.append(f"| `{Path(path).name}` | {label} | {size:.1f} MiB | {score_txt} | {kl_txt} |")
    head = (
        "The quickstart's fine-tuned Gemma 3 270M as GGUF files, each scored by"
        " `gemma3-tune eval FILE --backend llama.cpp --metric json` (real llama.cpp through"
        " llama-cpp-python 0.3.36, greedy, our rendered prompts) on the 60 held-out chats of"
        " data/quickstart/eval.jsonl; KL: mean over the held-out chats' tokens of"
        " KL(p_f32 || p_file) over the full vocabulary (whole chats, prompts included; and over"
        " the positions that predict the assistant's reply tokens, the ones SFT and QAT train),"
        f" the reference `{reference}` in fp32 and the file's weights de-quantized exactly into our model."
    )
    return "\n".join([head, "", *rows])


def section_dpo(args) -> str:
    from bench_preference import section_dpo as run

    return run(args)


def _section_gpu(args) -> str:
    from bench_gpu import section_gpu

    return section_gpu(args)


SECTIONS = {
    "lora": ("LoRA step on the real Gemma 3 270M", section_lora),
    "compile": ("Compiled decoder layers on CPU (270M LoRA step)", section_compile),
    "packing": ("Packing efficiency", section_packing),
    "cache": ("Vision-feature cache", section_cache),
    "kv": ("KV cache: 5 local : 1 global vs all global", section_kv),
    "gpu": ("GPU: LoRA and QLoRA steps, bf16, ours vs transformers + peft", _section_gpu),
    "prep": ("Data preparation at scale", section_prep),
    "eval": ("Held-out evaluation of the quickstart model", section_eval),
    "distill": ("Distillation: step time and memory vs SFT (270M)", section_distill),
    "quant": ("GGUF formats of the quickstart model in llama.cpp", section_quant),
    "dpo": ("DPO step: ours vs TRL's DPOTrainer (270M LoRA)", section_dpo),
}


def worker(argv: list[str]) -> None:
    kind, rest = argv[0], argv[1:]
    if kind == "lora":
        impl, model_dir, seq, dtype, steps, labels = rest
        out = lora_worker(impl, model_dir, int(seq), dtype, int(steps), labels)
    elif kind == "cache":
        shape, mode, steps = rest
        out = cache_worker(shape, mode, int(steps))
    elif kind == "gpu":
        from bench_gpu import gpu_worker

        impl, case, steps, scratch, profile = rest
        out = gpu_worker(impl, case, int(steps), scratch, profile == "1")
    elif kind == "prep":
        out = prep_worker(*rest)
    elif kind == "eval":
        out = eval_worker(*rest)
    elif kind == "quant-kl":
        out = quant_kl_worker(*rest)
    elif kind == "distill-fill":
        model_dir, seq, samples, out_path = rest
        out = distill_fill_worker(model_dir, int(seq), int(samples), out_path)
    elif kind == "distill":
        impl, model_dir, seq, samples, targets = rest
        out = distill_worker(impl, model_dir, int(seq), int(samples), targets)
    elif kind == "dpo":
        from bench_preference import dpo_worker

        impl, model_dir, pair_path, steps = rest
        out = dpo_worker(impl, model_dir, pair_path, int(steps))
    elif kind == "loss":
        from bench_gpu import loss_worker

        impl, hidden, tokens, steps = rest
        out = loss_worker(impl, int(hidden), int(tokens), int(steps))
    else:
        raise SystemExit(f"unknown worker {kind}")
    print(json.dumps(out))


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def _gpu_cases(s: str) -> list[str]:
    from bench_gpu import GPU_CASES, GPU_EXTRA

    names = [x for x in s.split(",") if x]
    unknown = [x for x in names if x not in GPU_CASES and x not in GPU_EXTRA]
    if unknown:
        choices = ", ".join([*GPU_CASES, *GPU_EXTRA])
        raise argparse.ArgumentTypeError(f"unknown case {unknown[0]!r}; choose from {choices}")
    return names


def _gpu_impls(s: str) -> list[str]:
    from bench_gpu import GPU_IMPLS

    names = [x for x in s.split(",") if x]
    if unknown := [x for x in names if x not in GPU_IMPLS]:
        raise argparse.ArgumentTypeError(
            f"unknown side {unknown[0]!r}; choose from {', '.join(GPU_IMPLS)}"
        )
    return names


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        return worker(sys.argv[2:])
    # `timeout` (scripts/gpu_check.sh) stops a run with SIGTERM: exit through Python, so the
    # temporary folders (a 4B checkpoint for QLoRA) are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
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
    args = p.parse_args()
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
