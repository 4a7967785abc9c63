"""The quickstart, end to end: real Gemma 3 270M -> eval -> LoRA -> eval -> merged export.

    scripts/quickstart.sh [--force]            # the full run (a few minutes on a laptop CPU)
    python scripts/quickstart.py --steps 2 --eval-n 3 --out /tmp/qs   # a smoke test

Writes OUT/eval.json: {"metric": "json_exact_match", "before": x, "after": y, "n": N}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gemma3_tune.cli import main as cli  # noqa: E402
from gemma3_tune.data.tokenizer import Tokenizer  # noqa: E402
from gemma3_tune.errors import UserError  # noqa: E402
from gemma3_tune.export.inference import chat_ids, load_with_adapter  # noqa: E402
from gemma3_tune.model.embedded import embedded_model_dir  # noqa: E402
from gemma3_tune.model.generate import generate_batch  # noqa: E402
from gemma3_tune.outputs import refuse_existing  # noqa: E402


def score(reply_text: str, want: dict) -> bool:
    """Schema-valid and field-exact: the reply parses as JSON and equals the expected card."""
    try:
        got = json.loads(reply_text.strip())
    except json.JSONDecodeError:
        return False
    return got == want


def evaluate(
    model, tok, rows, label: str, batch: int = 30
) -> tuple[float, list[tuple[str, str, bool]]]:
    """Greedy replies through our KV-cache decoder, many prompts per batch."""
    t0 = time.perf_counter()
    prompts = [row["messages"][0]["content"] for row in rows]
    ids = [chat_ids(tok, model, p)[0][0].tolist() for p in prompts]
    replies: list[list[int]] = []
    for i in range(0, len(ids), batch):
        replies += generate_batch(
            model,
            ids[i : i + batch],
            max_new_tokens=40,
            stop_ids={tok.end_of_turn, tok.eos_id},
            pad_id=tok.pad_id,
        )
    results = []
    for prompt, row, out in zip(prompts, rows, replies, strict=True):
        text = tok.decode(out)
        results.append((prompt, text, score(text, json.loads(row["messages"][1]["content"]))))
    acc = sum(ok for *_, ok in results) / len(rows)
    print(f"  {label}: {acc:.0%} exact ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return acc, results


def run(out: Path, steps: int | None, eval_n: int, force: bool) -> dict:
    try:
        refuse_existing(out, force)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print("[1/5] the real Gemma 3 270M (converted once from the packaged GGUF)", file=sys.stderr)
    base = embedded_model_dir("gemma3-270m")
    tok = Tokenizer(base)
    rows = [json.loads(x) for x in (ROOT / "data/quickstart/eval.jsonl").read_text().splitlines()][
        :eval_n
    ]
    torch.manual_seed(0)

    print("[2/5] held-out score of the base model", file=sys.stderr)
    before, _ = evaluate(load_with_adapter(base, None).eval(), tok, rows, "before")

    print("[3/5] LoRA fine-tuning (recipes/quickstart.yaml)", file=sys.stderr)
    overrides = [f"training.output_dir={out / 'train'}", "training.force=true"]
    if steps is not None:
        overrides += [f"training.max_steps={steps}", f"training.save_steps={steps}"]
    if cli(["train", str(ROOT / "recipes/quickstart.yaml"), *overrides]) != 0:
        sys.exit(1)

    print("[4/5] held-out score after fine-tuning", file=sys.stderr)
    tuned = load_with_adapter(base, out / "train" / "adapter").eval()
    after, results = evaluate(tuned, tok, rows, "after")

    print("[5/5] merged export (transformers / vLLM folder)", file=sys.stderr)
    if (
        cli(
            [
                "export",
                str(out / "train"),
                "--out",
                str(out / "merged"),
                "--dtype",
                "float32",
                "--force",
            ]
        )
        != 0
    ):
        sys.exit(1)

    report = {"metric": "json_exact_match", "before": before, "after": after, "n": len(rows)}
    (out / "eval.json").write_text(json.dumps(report) + "\n")
    minutes = (time.perf_counter() - start) / 60
    print(f"\n| held-out ({len(rows)} samples) | JSON exact match |\n|---|---|")
    print(f"| base Gemma 3 270M | {before:.0%} |\n| after LoRA | {after:.0%} |\n")
    for prompt, text, ok in results[:3]:
        print(f"> {prompt.splitlines()[-1]}\n{text.strip()}   {'(exact)' if ok else '(wrong)'}\n")
    print(
        f"done in {minutes:.1f} min; merged model in {out / 'merged'}; eval in {out / 'eval.json'}"
    )
    return report


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "quickstart")
    p.add_argument("--steps", type=int, default=None, help="override training.max_steps")
    p.add_argument("--eval-n", type=int, default=60, help="held-out samples to score")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    a = p.parse_args()
    run(a.out, a.steps, a.eval_n, a.force)
