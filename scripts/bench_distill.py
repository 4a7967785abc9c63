"""Benchmark section `distill`: a distillation step (teacher targets cached, or computed in the
step) vs an SFT step on the 270M at 512/2048 tokens: time, peak memory, teacher fill tokens/s,
cache bytes. Workers: `python scripts/bench.py _worker distill-fill ...` and `_worker distill
...`, dispatched to `distill_fill_worker` and `distill_worker` here.

    python scripts/bench.py --sections distill --seq 512,2048
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

import torch
from bench_harness import chat_tokens, run_worker, student, timed_steps


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
