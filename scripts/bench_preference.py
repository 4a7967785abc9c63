"""Benchmark section `dpo`: one DPO step of gemma3-tune against TRL's `DPOTrainer`.

    python scripts/bench.py --sections dpo --seq 512,1024 --no-append

Both sides train LoRA r=16 on every decoder linear of the real Gemma 3 270M in fp32, micro-batch
one preference pair, each in its own fresh process (`python scripts/bench.py _worker dpo ...`,
dispatched to `dpo_worker` here), on exactly the same token ids:

- TRL: `Gemma3ForCausalLM` (transformers, SDPA) given to `DPOTrainer` with a `peft_config`, the
  pair as TRL's conversational preference row (its own tokenization through the tokenizer's chat
  template, checked against ours token for token), `precompute_ref_log_probs=True` (the
  reference forward runs over the dataset in `DPOTrainer.__init__`, so the timed steps hold no
  reference pass: TRL's fastest setting with a fixed reference), `trainer.train()` timed step by
  step by a callback (`on_step_begin` to `on_step_end`: forward, backward, clipping, AdamW).
- ours: the pair as one packed row of two documents (prompt + chosen, prompt + rejected, positions
  restarting at 0), `model(..., sequence_logps=True)` -> `pairs` -> `dpo_loss` against reference
  log-probs computed before the timed steps (adapter disabled, no grad: what `ref_logps` in the
  batch holds), backward, AdamW.

A "pair of N tokens" is two documents of N/2 tokens each (prompt + reply, the replies of equal
length), so TRL's batch is `[2, N/2]` with no padding (its `max_length` = N/2: TRL truncates each
sequence on its own) and ours one row of N tokens: both compute N positions.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_harness import LORA_TARGETS, run_worker, student, timed_steps

BETA = 0.1
LR = 1e-4
# Gemma's tokenizer splits digits one per token: a run of digits in the prompt pads a document to
# an exact length, and a reply with other digits in it is exactly as long as the original.
TICKET = "Ticket {digits}. Turn each of these into a JSON contact card, one per line.\n\n"


# ---------------------------------------------------------------------------------------------
# The pair: quickstart-style contact cards, several per prompt


def _cards(rng: random.Random, n: int) -> list[dict]:
    from make_quickstart_data import CITIES, FIRST, LAST

    return [
        {
            "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
            "age": rng.randint(18, 89),
            "city": rng.choice(CITIES),
            "phone": f"555-{rng.randint(0, 9999):04d}",
        }
        for _ in range(n)
    ]


def _wrong(card: dict, rng: random.Random) -> dict:
    """The rejected reply's card: another two-digit age and other phone digits (same length)."""
    age = rng.choice([a for a in range(18, 90) if a != card["age"]])
    return {**card, "age": age, "phone": f"555-{(int(card['phone'][4:]) + 1234) % 10000:04d}"}


def _conversation(cards: list[dict], texts: list[str], digits: int, rng: random.Random) -> dict:
    """TRL's conversational preference row: {"prompt", "chosen", "rejected"} message lists."""
    user = TICKET.format(digits="7" * digits) + "\n".join(texts)
    reply = "\n".join(json.dumps(c) for c in cards)
    wrong = "\n".join(json.dumps(_wrong(c, rng)) for c in cards)
    return {
        "prompt": [{"role": "user", "content": user}],
        "chosen": [{"role": "assistant", "content": reply}],
        "rejected": [{"role": "assistant", "content": wrong}],
    }


def _tokenize(tok, row: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids as TRL 1.16's `DPOTrainer._prepare_dataset` makes them:
    the chat template applied to the prompt (with the generation prompt) and to prompt + reply,
    the reply being what follows the common prefix."""

    def ids(messages: list, **kw) -> list[int]:
        return tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]

    prompt = ids(row["prompt"], add_generation_prompt=True)
    chosen = ids(row["prompt"] + row["chosen"])
    rejected = ids(row["prompt"] + row["rejected"])
    if chosen[: len(prompt)] != prompt or rejected[: len(prompt)] != prompt:
        raise RuntimeError("the template renders the prompt differently before a reply")
    return prompt, chosen[len(prompt) :], rejected[len(prompt) :]


def preference_pair(model_dir: str, pair_tokens: int, seed: int = 0) -> dict:
    """One pair whose two documents (prompt + chosen, prompt + rejected) are each exactly
    `pair_tokens // 2` tokens: as many cards as fit, then the prompt padded with ticket digits.
    Returns the TRL row and its ids; raises if our own template renders other ids."""
    import transformers
    from make_quickstart_data import TEMPLATES

    from gemma3_tune.data.template import Turn, render
    from gemma3_tune.data.tokenizer import Tokenizer

    doc = pair_tokens // 2
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    cards = _cards(rng, 64)
    texts = [rng.choice(TEMPLATES).format(**c) for c in cards]

    def build(n: int, digits: int) -> tuple[dict, tuple[list[int], list[int], list[int]]]:
        row = _conversation(cards[:n], texts[:n], digits, random.Random(seed + n))
        return row, _tokenize(tok, row)

    def length(n: int) -> int:  # one document with n cards and a one-digit ticket
        p, c, _ = build(n, 1)[1]
        return len(p) + len(c)

    n = 1
    while length(n + 1) <= doc:
        n += 1
    row, (p, c, r) = build(n, 1 + doc - length(n))
    if not (len(p) + len(c) == len(p) + len(r) == doc):
        raise RuntimeError(f"pair of {len(p)}+{len(c)}/{len(r)} tokens, wanted {doc} per document")
    turns = [Turn(m["role"], [m["content"]]) for m in row["prompt"] + row["chosen"]]
    if render(turns, Tokenizer(model_dir), None).input_ids != p + c:
        raise RuntimeError("our chat template renders other ids than the tokenizer's template")
    return {"row": row, "prompt": p, "chosen": c, "rejected": r, "cards": n}


# ---------------------------------------------------------------------------------------------
# Workers


def _status_gib(key: str) -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(x.split()[1]) / 2**20 for x in status if x.startswith(key + ":"))


class Peaks:
    """The process's peak RSS (VmHWM, loading included) and the steps' own: `start()` right
    before the first step resets the kernel's high-water mark to the resident set then (Linux
    `clear_refs` 5), so the steps' peak is what they add over the loaded model, its data and
    optimizer."""

    def start(self) -> None:
        self.loading = _status_gib("VmHWM")
        self.base = _status_gib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")

    def result(self) -> dict:
        steps = _status_gib("VmHWM")
        return {
            "peak_gib": max(self.loading, steps),
            "step_peak_gib": steps - self.base,
            "before_steps_gib": self.loading,  # the high-water mark of loading and reference
            "resident_gib": self.base,
        }


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _ours(model_dir: str, pair: dict, steps: int, checkpointing: bool = False) -> dict:
    """Our step: the pair as one packed row, sequence log-probs, `dpo_loss`, AdamW."""
    from gemma3_tune.train.objectives.preference_loss import dpo_loss, pairs

    p, c, r = pair["prompt"], pair["chosen"], pair["rejected"]
    ids = torch.tensor([p + c + p + r])  # [1, N]
    pos = torch.tensor([list(range(len(p + c))) + list(range(len(p + r)))])  # [1, N]
    # TRL's completion mask: every token after the prompt is scored, the template's trailing
    # newline after <end_of_turn> included.
    labels = torch.tensor([[-100] * len(p) + c + [-100] * len(p) + r])  # [1, N]
    model = student(model_dir)
    if checkpointing:  # what training.gradient_checkpointing: true does
        model.get_base_model().gradient_checkpointing_enable()
    kw = {"input_ids": ids, "position_ids": pos, "labels": labels, "sequence_logps": True}
    with torch.no_grad(), model.disable_adapter():  # the reference: the base model
        out = model(**kw)
        ref, _ = pairs(out.logps, out.tokens)  # [1, 2]
    model.train()
    trained = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trained, lr=LR, weight_decay=0.0)
    losses: list[float] = []

    def step() -> None:
        out = model(**kw)
        policy, tokens = pairs(out.logps, out.tokens)  # [1, 2] each
        loss, _ = dpo_loss(policy, ref, tokens, BETA, "sigmoid", 0.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    peaks = Peaks()
    peaks.start()
    times = timed_steps(step, steps)
    return {
        "step_s": statistics.median(times),
        **peaks.result(),
        "ref": ref[0].tolist(),
        "losses": losses,
        "trainable": _trainable(model),
    }


def _trl(model_dir: str, pair: dict, steps: int, checkpointing: bool = False) -> dict:
    """TRL's step as its user writes it: DPOConfig + DPOTrainer(peft_config=...) + train()."""
    import datasets
    import peft
    import transformers
    import trl

    doc = len(pair["prompt"]) + len(pair["chosen"])
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS)
    # One row: the reference pass runs once, and the Trainer repeats it for `1 + steps` steps.
    data = datasets.Dataset.from_list([pair["row"]])
    times: list[float] = []
    peaks = Peaks()

    class StepTimer(transformers.TrainerCallback):
        def on_train_begin(self, *_, **__):
            peaks.start()

        def on_step_begin(self, *_, **__):
            self.t = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        args = trl.DPOConfig(
            output_dir=out,
            max_steps=1 + steps,
            per_device_train_batch_size=1,
            learning_rate=LR,
            lr_scheduler_type="constant",  # as ours
            beta=BETA,
            loss_type=["sigmoid"],
            max_length=doc,  # per sequence: prompt + chosen, prompt + rejected; nothing is cut
            precompute_ref_log_probs=True,
            gradient_checkpointing=checkpointing,  # DPOConfig's default is True: set as ours
            bf16=False,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            seed=0,
        )
        trainer = trl.DPOTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tok,
            peft_config=lora,
            callbacks=[StepTimer()],
        )
        first = trainer.train_dataset[0]
        seen = (first["prompt_ids"], first["chosen_ids"], first["rejected_ids"])
        if seen != (pair["prompt"], pair["chosen"], pair["rejected"]):
            raise RuntimeError("TRL tokenized the pair into other ids than ours")
        ref = [first["ref_chosen_logps"], first["ref_rejected_logps"]]
        trainer.train()
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    return {
        "step_s": statistics.median(times[1:]),  # one warm-up, as timed_steps
        **peaks.result(),
        "ref": ref,
        "losses": losses,
        "trainable": _trainable(trainer.model),
    }


def dpo_worker(impl: str, model_dir: str, pair_path: str, steps: int) -> dict:
    """One process, one side (`ours` or `trl`): `steps` timed DPO steps after a warm-up, on
    the pair `preference_pair` wrote to `pair_path` (built by the parent, so neither worker's
    peak holds tokenizers it would not load anyway: ours gets ids, TRL tokenizes itself)."""
    torch.manual_seed(0)
    pair = json.loads(Path(pair_path).read_text())
    name, _, gc = impl.partition("-")  # ours | trl, and "-gc": gradient checkpointing on
    run = {"ours": _ours, "trl": _trl}[name]
    return {**run(model_dir, pair, steps, gc == "gc"), "reply": len(pair["chosen"])}


# ---------------------------------------------------------------------------------------------
# Section


def _cell(r: dict, key: str, fmt: str) -> str:
    return r["error"] if "error" in r else fmt.format(r[key])


def _ratio(a: dict, b: dict, key: str) -> str:
    return "" if "error" in a or "error" in b else f"{a[key] / b[key]:.2f}x"


def _ref(r: dict) -> str:
    return "" if "error" in r else f"{r['ref'][0]:.3f} / {r['ref'][1]:.3f}"


def _row(pair_tokens: int, gc: bool, reply: int, ours: dict, base: dict) -> str:
    gib = "{:.2f} GiB"
    return (
        f"| {pair_tokens} (2 x {pair_tokens // 2}) | {'on' if gc else 'off'} | {reply}"
        f" | {_cell(ours, 'step_s', '{:.2f}')} | {_cell(base, 'step_s', '{:.2f}')}"
        f" | {_ratio(ours, base, 'step_s')}"
        f" | {_cell(ours, 'peak_gib', gib)} | {_cell(base, 'peak_gib', gib)}"
        f" | {_ratio(ours, base, 'peak_gib')}"
        f" | {_cell(ours, 'step_peak_gib', gib)} | {_cell(base, 'step_peak_gib', gib)}"
        f" | {_ratio(ours, base, 'step_peak_gib')} | {_ref(ours)} | {_ref(base)} |"
    )


def section_dpo(args) -> str:
    """`--seq`: the pair sizes (tokens of both documents together); `--steps`: timed steps."""
    import trl

    from gemma3_tune.convert.embedded import embedded_model_dir

    model_dir = str(embedded_model_dir("gemma3-270m"))
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # a fixed threshold: peaks comparable
    rows = [
        f"| pair tokens | gradient checkpointing | reply tokens per document | ours s/step | TRL {trl.__version__} s/step"
        " | time ratio | ours peak | TRL peak | ratio | ours step memory | TRL step memory"
        " | ratio | reference logp chosen / rejected: ours | TRL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for pair_tokens in args.seq:
            pair = preference_pair(model_dir, pair_tokens)
            path = Path(tmp) / f"pair-{pair_tokens}.json"
            path.write_text(json.dumps(pair))
            common = [model_dir, str(path), str(args.steps)]
            for gc in (False, True):
                tag = "-gc" if gc else ""
                ours = run_worker(["dpo", "ours" + tag, *common])
                base = run_worker(["dpo", "trl" + tag, *common])
                print(f"dpo {pair_tokens} gc={gc}: ours {ours} | trl {base}", flush=True)
                rows.append(_row(pair_tokens, gc, len(pair["chosen"]), ours, base))
    head = (
        "One DPO step (sigmoid loss, beta 0.1) of the real Gemma 3 270M (`gguf:gemma3-270m`),"
        " LoRA r=16 on every decoder linear, fp32, AdamW (lr 1e-4, constant), micro-batch 1"
        " pair, each side in its own process, with gradient checkpointing off (as our recipes"
        " default) and on (as TRL's DPOConfig defaults; ours: training.gradient_checkpointing). A pair of N tokens is"
        " two documents of N/2, prompt + chosen and prompt + rejected (quickstart-style contact"
        " cards, several per prompt, padded to length with ticket digits; the rejected reply"
        " has wrong digits, so both replies are equally long): TRL's batch is [2, N/2] with no"
        " padding (`max_length` N/2, per sequence), ours one packed row of N tokens (positions"
        " restart at the second document); the same token ids (checked against TRL's own"
        " tokenization) and the same scored tokens (every reply token, the template's newline"
        " after `<end_of_turn>` included). TRL: `DPOTrainer(model=Gemma3ForCausalLM (SDPA),"
        " peft_config=LoraConfig(...), processing_class=tokenizer)` on the conversational row,"
        " `precompute_ref_log_probs=True` (its fastest setting for a fixed reference: the"
        " reference pass runs once in `__init__`, none in the steps), `trainer.train()` timed"
        " from `on_step_begin` to `on_step_end` (forward, backward, clipping, AdamW). Ours:"
        " `model(..., sequence_logps=True)` -> `pairs` -> `dpo_loss`, the reference log-probs"
        " computed before the steps with the adapter disabled (what `ref_logps` in a batch"
        f" holds). Median of {args.steps} steps after a warm-up. Peak: VmHWM of the process"
        " with glibc's mmap threshold fixed (64 KiB), model loading, tokenizer (TRL needs it"
        " in the process; ours gets token ids) and reference pass included. Step memory: the"
        " high-water mark during the steps (reset with `clear_refs` right before the first)"
        " minus the resident set then, i.e. what a step adds over the loaded model and data."
        " The reference log-probs (summed over each reply) must agree: same weights, same"
        " tokens. On CPU, TRL's fused LM head takes its torch path (`_use_triton` is CUDA/XPU"
        " only): it projects every position, prompt included, in [T, 32768] tiles and also"
        " computes its entropy, mean-logit and top-1 metrics; on a GPU it runs Triton kernels"
        " on the scored positions only, so these times say little about a GPU."
    )
    return "\n".join([head, "", *rows])


if __name__ == "__main__":
    sys.exit("run through scripts/bench.py --sections dpo")
