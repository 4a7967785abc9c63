"""Benchmark section `eval`: the quickstart's 60 held-out chats scored by `gemma3-tune eval`, by
the quickstart's previous scorer and by transformers' generate, each in its own process
(`python scripts/bench.py _worker eval ...`, dispatched to `eval_worker` here). Needs
runs/quickstart/merged (`--eval-model`).

    python scripts/bench.py --sections eval
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from bench_harness import ROOT, run_worker

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
