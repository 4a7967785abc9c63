"""The quickstart, end to end: real Gemma 3 270M -> LoRA -> `gemma3-tune eval` of the base and
the tuned model side by side -> merged export.

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
from gemma3_tune.convert.embedded import embedded_model_dir  # noqa: E402
from gemma3_tune.errors import UserError  # noqa: E402
from gemma3_tune.eval.metrics import json_equal  # noqa: E402
from gemma3_tune.eval.report import table  # noqa: E402
from gemma3_tune.eval.runner import evaluate as evaluate_targets  # noqa: E402
from gemma3_tune.eval.runner import load_samples  # noqa: E402
from gemma3_tune.eval.targets import parse_target  # noqa: E402
from gemma3_tune.outputs import refuse_existing  # noqa: E402


def evaluate(targets: list[str], rows: int) -> tuple[list[float], list]:
    """`gemma3-tune eval`'s scorer (metric json: the reply parses and equals the expected
    card), the base and the tuned model side by side on the first `rows` held-out chats."""
    t0 = time.perf_counter()
    samples = load_samples(ROOT / "data/quickstart/eval.jsonl", rows)
    found = [parse_target(t) for t in targets]
    results = evaluate_targets(found, samples, ["json"], max_new_tokens=40, batch_size=30)
    print(table(results, ["json"], len(samples)), file=sys.stderr)
    print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return [r.scores["json"] for r in results], list(zip(samples, results[-1].replies, strict=True))


def shown(path: Path) -> str:
    """`path` as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def run(out: Path, steps: int | None, eval_n: int, force: bool) -> dict:
    try:
        refuse_existing(out, force)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print("[1/4] the real Gemma 3 270M (converted once from the packaged GGUF)", file=sys.stderr)
    embedded_model_dir("gemma3-270m")
    torch.manual_seed(0)

    print("[2/4] LoRA fine-tuning (recipes/quickstart.yaml)", file=sys.stderr)
    overrides = [f"training.output_dir={out / 'train'}", "training.force=true"]
    if steps is not None:
        overrides += [f"training.max_steps={steps}", f"training.save_steps={steps}"]
    if cli(["train", str(ROOT / "recipes/quickstart.yaml"), *overrides]) != 0:
        sys.exit(1)

    print("[3/4] held-out score, base and fine-tuned (gemma3-tune eval)", file=sys.stderr)
    (before, after), results = evaluate(["gguf:gemma3-270m", shown(out / "train")], eval_n)

    print("[4/4] merged export (transformers / vLLM folder)", file=sys.stderr)
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

    report = {"metric": "json_exact_match", "before": before, "after": after, "n": len(results)}
    (out / "eval.json").write_text(json.dumps(report) + "\n")
    minutes = (time.perf_counter() - start) / 60
    print(f"\n| held-out ({len(results)} samples) | JSON exact match |\n|---|---|")
    print(f"| base Gemma 3 270M | {before:.0%} |\n| after LoRA | {after:.0%} |\n")
    for sample, text in results[:3]:
        ok = json_equal(text, sample.reference)
        print(
            f"> {sample.prompt_text().splitlines()[-1]}\n{text.strip()}   {'(exact)' if ok else '(wrong)'}\n"
        )
    print(
        f"done in {minutes:.1f} min; merged model in {shown(out / 'merged')}; eval in {shown(out / 'eval.json')}"
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
