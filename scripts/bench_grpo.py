"""One GRPO step of the real Gemma 3 270M: ours vs TRL's GRPOTrainer, each in its own process.

    python scripts/bench_grpo.py [--prompts 8] [--generations 8] [--tokens 64] [--steps 2]

Both sides: LoRA r=16 on every decoder linear, bf16 compute (ours: fp32 adapter masters under
autocast; TRL: bf16 weights, `bf16=True`), AdamW, loss dapo, temperature 1, every completion
exactly `--tokens` long (ours: no stop token; TRL: `min_new_tokens`), the same prompts
(quickstart-style requests in the chat template), one step = generating prompts x generations
completions, then the loss, backward and optimizer step. Generation and training are timed
apart (TRL: its `_generate_and_score_completions`, which also scores the rewards; ours: the
same work in `GRPO.rollout`'s parts); median over `--steps` after one warm-up. Peak: the
process's VmHWM, model loading included. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REQUESTS = [
    "Turn this into a JSON contact card.\n\nHi, I'm Maria Lopez from Denver. I am 34 years old"
    f" and my number is 555-01{k:02d}."
    for k in range(64)
]


def _peak_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def ours(model_dir: str, prompts: int, group: int, tokens: int, steps: int) -> dict:
    import torch

    from gemma3_tune.data.template import Turn, generation_prompt
    from gemma3_tune.data.tokenizer import Tokenizer
    from gemma3_tune.model.checkpoint import load_model
    from gemma3_tune.model.generate import generate_groups
    from gemma3_tune.train import precision
    from gemma3_tune.train.adapters import apply_method, unwrap
    from gemma3_tune.train.objectives.grpo import Rollout, completion_logps, generators
    from gemma3_tune.train.objectives.grpo_loss import PolicyLossSettings, policy_loss
    from gemma3_tune.train.recipe import Recipe

    recipe = Recipe.model_validate(
        {"model": {"path": model_dir}, "data": {"train": "unused.jsonl"},
         "lora": {"r": 16, "alpha": 32, "dropout": 0.0}}
    )  # fmt: skip
    tok = Tokenizer(model_dir)
    model = apply_method(load_model(model_dir, dtype=torch.bfloat16), recipe)
    precision.prepare(model, torch.bfloat16, deepspeed=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = [generation_prompt([Turn("user", [r])], tok, None)[0] for r in REQUESTS[:prompts]]
    shell = [type("P", (), {"ids": ids, "images": []})() for ids in batch]
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            model.eval()
            gens = generators(0, step, list(range(prompts)), group, "cpu")
            completions, cut = generate_groups(
                unwrap(model), batch, group, gens, max_new_tokens=tokens, stop_ids=set()
            )
            model.train()
        rewards = torch.rand(len(completions))
        adv = (rewards - rewards.view(-1, group).mean(1).repeat_interleave(group)) / 0.3
        t1 = time.perf_counter()
        n = len(completions)
        ro = Rollout(shell, completions, torch.tensor(cut), [""] * n, rewards[:, None], rewards,
                     adv, torch.zeros(n, dtype=torch.bool), None, 0.0)  # fmt: skip
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps = completion_logps(model, ro, tok.pad_id, 1.0)
        mask = torch.ones_like(logps, dtype=torch.bool)
        loss, _ = policy_loss(logps, None, None, adv, mask, PolicyLossSettings(), 1, mask.sum())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append((t1 - t0, time.perf_counter() - t1))
    return _summary(times[1:], n, tokens)


def trl(model_dir: str, prompts: int, group: int, tokens: int, steps: int) -> dict:
    import peft
    import torch
    import trl as trl_lib
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    class Timed(trl_lib.GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            self.gen_seconds.append(time.perf_counter() - t0)
            return out

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            totals.append(time.perf_counter() - self.t0)

    totals: list[float] = []
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    rows = [[{"role": "user", "content": r}] for r in REQUESTS[:prompts]] * (steps + 1)
    with tempfile.TemporaryDirectory() as out:
        args = trl_lib.GRPOConfig(
            output_dir=out, per_device_train_batch_size=prompts * group, num_generations=group,
            max_completion_length=tokens, temperature=1.0, loss_type="dapo", beta=0.0,
            generation_kwargs={"min_new_tokens": tokens}, bf16=True, use_cpu=True,
            report_to=[], max_steps=steps + 1, logging_steps=1, learning_rate=1e-5,
            gradient_checkpointing=False, save_strategy="no", shuffle_dataset=False,
        )  # fmt: skip
        trainer = Timed(
            model=model, args=args, processing_class=tok,
            train_dataset=Dataset.from_dict({"prompt": rows}),
            reward_funcs=[lambda completions, **kw: torch.rand(len(completions)).tolist()],
            peft_config=peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                        target_modules="all-linear"),
            callbacks=[Steps()],
        )  # fmt: skip
        trainer.gen_seconds = []
        trainer.train()
    times = [(g, t - g) for g, t in zip(trainer.gen_seconds, totals, strict=True)]
    return _summary(times[1:], prompts * group, tokens)


def _summary(times: list[tuple[float, float]], completions: int, tokens: int) -> dict:
    gen, train = (statistics.median(x) for x in zip(*times, strict=True))
    return {"generation_s": gen, "training_s": train, "step_s": gen + train,
            "peak_gib": _peak_gib(), "completions": completions, "tokens": tokens}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--worker", choices=["ours", "trl"])
    p.add_argument("--model")
    a = p.parse_args()
    if a.worker:
        fn = ours if a.worker == "ours" else trl
        print(json.dumps(fn(a.model, a.prompts, a.generations, a.tokens, a.steps)))
        return
    from gemma3_tune.convert.embedded import embedded_model_dir

    model = str(embedded_model_dir("gemma3-270m"))
    res = {}
    for side in ("ours", "trl"):
        cmd = [sys.executable, __file__, "--worker", side, "--model", model,
               "--prompts", str(a.prompts), "--generations", str(a.generations),
               "--tokens", str(a.tokens), "--steps", str(a.steps)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:  # -9: the OOM killer (the machine's memory, not a bug of the side)
            why = "killed (out of memory)" if out.returncode == -9 else f"exit {out.returncode}"
            res[side] = {"error": why}
        else:
            res[side] = json.loads(out.stdout.strip().splitlines()[-1])
    print("| side | generation s | training s | step s | peak GiB |\n|---|---|---|---|---|")
    for side, r in res.items():
        if "error" in r:
            print(f"| {side} | {r['error']} | | | |")
            continue
        print(f"| {side} | {r['generation_s']:.1f} | {r['training_s']:.1f} | {r['step_s']:.1f}"
              f" | {r['peak_gib']:.2f} |")  # fmt: skip
    o, t = res["ours"], res["trl"]
    if "error" not in o and "error" not in t:
        print(f"| ours / TRL | {o['generation_s'] / t['generation_s']:.2f}x"
              f" | {o['training_s'] / t['training_s']:.2f}x | {o['step_s'] / t['step_s']:.2f}x"
              f" | {o['peak_gib'] / t['peak_gib']:.2f}x |")  # fmt: skip
    print(
        f"\n{a.prompts} prompts x {a.generations} completions x {a.tokens} tokens,"
        f" median of {a.steps} steps after one warm-up; {Path(model).name}"
    )


if __name__ == "__main__":
    main()
