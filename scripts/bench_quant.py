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
