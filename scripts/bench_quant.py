r"""Benchmark section `quant`: GGUF files of the quickstart model (`--quant-targets`): size,
held-out score in real llama.cpp, KL(f32 || file) per token (`python scripts/bench.py _worker
quant-kl ...`, dispatched to `quant_kl_worker` here).

    python scripts/bench.py --sections quant --eval-model runs/quickstart/merged \
        --quant-targets "f16=runs/gguf/qs.f16.gguf,PTQ q4_0=runs/gguf/qs.q4_0.gguf"
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from bench_harness import ROOT, run_worker


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


HELD_OUT = ROOT / "data/quickstart/eval.jsonl"  # the quickstart's 60 held-out chats
REPHRASED = ROOT / "data/grpo/heldout.jsonl"  # 40 chats in templates it never trained on
PROSE = ROOT / "data/prose/heldout.jsonl"  # scripts/make_prose_corpus.py: nobody trained on it


def _llama_cpp_score(path: str, data: Path, metric: str) -> str:
    """`gemma3-tune eval FILE --backend llama.cpp --metric METRIC` on `data`, as a cell."""
    if not data.is_file():
        return "n/a"
    cmd = [sys.executable, "-m", "gemma3_tune", "eval", path, "--data", str(data), "--metric",
           metric, "--backend", "llama.cpp", "--json"]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1")
    )
    try:
        score = json.loads(proc.stdout.strip().splitlines()[-1])["scores"][path]
    except (IndexError, KeyError, json.JSONDecodeError):
        return f"failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
    return f"{100 * score:.1f}%" if metric == "json" else f"{score:.4f}"


def section_quant(args) -> str:
    """`--quant-targets LABEL=FILE.gguf,...` (and `--eval-model` as the f32 reference): size,
    JSON exact match in real llama.cpp on the held-out and the rephrased chats, llama.cpp's NLL
    per token on the held-out prose, and KL(f32 || file) per token."""
    reference = args.eval_model
    rows = [
        "| file | format | size | json exact, 60 held out | json exact, 40 rephrased"
        " | prose NLL/token (llama.cpp) | KL(f32 \\|\\| file) per token, whole chats"
        " | KL per reply token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for item in args.quant_targets:
        label, path = item.split("=", 1)
        held, rephrased = (_llama_cpp_score(path, d, "json") for d in (HELD_OUT, REPHRASED))
        prose = _llama_cpp_score(path, PROSE, "loss")
        kl = run_worker(["quant-kl", reference, path, str(HELD_OUT)])
        kl_txt = kl["error"] if "error" in kl else f"{kl['kl']:.4f} | {kl['kl_reply']:.4f}"
        size = Path(path).stat().st_size / 2**20
        cells = f"{held} | {rephrased} | {prose} | {kl_txt}"
        print(f"quant {label}: {cells}, {size:.1f} MiB", flush=True)
        rows.append(f"| `{Path(path).name}` | {label} | {size:.1f} MiB | {cells} |")
    head = (
        "GGUF files, each scored in real llama.cpp (llama-cpp-python 0.3.36, `gemma3-tune eval"
        " FILE --backend llama.cpp`): JSON exact match, greedy, on the quickstart's 60 held-out"
        " chats (data/quickstart/eval.jsonl) and on 40 chats phrased in templates it never"
        " trained on (data/grpo/heldout.jsonl); `--metric loss` on 40 pages of vLLM 0.34.0's"
        " docs (scripts/make_prose_corpus.py; 2026 text nothing here trained on). KL: mean over"
        " the held-out chats' tokens of KL(p_f32 || p_file) over the full vocabulary (whole"
        " chats, prompts included; and over the positions that predict the reply tokens), the"
        f" reference `{reference}` in fp32 and the file's weights de-quantized exactly into our"
        " model."
    )
    return "\n".join([head, "", *rows])
