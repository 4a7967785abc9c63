"""`eval.metric` in a recipe: after `gemma3-tune train`, the run is scored on its held-out chats
(`data.eval`, or the `data.eval_split` rows) into `eval.json` and its model card. The command
that trained calls this (cli), so train/ never imports eval/."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from ..data.documents import document_kind
from ..data.settings import turn_options
from ..data.sources import read_records, to_turns
from ..errors import UserError
from ..outputs import write_atomic
from .metrics import PREFERENCE, REWARD
from .report import table
from .runner import EvalPair, EvalSample, _pair, evaluate, load_pairs, load_samples
from .targets import Target


def held_out_samples(recipe) -> list[EvalSample] | list[EvalPair]:
    """The chats (or, for `eval.metric: preference`, the pairs) the run held out, as eval
    samples (prompt turns + reference) or pairs."""
    d, limit = recipe.data, recipe.eval.limit
    pairs = PREFERENCE in recipe.eval.metric
    if pairs and len(recipe.eval.metric) > 1:
        raise UserError(
            "eval.metric: preference scores pairs, the other metrics chats; keep one of them"
        )
    if pairs and recipe.objective == "sft":
        raise UserError(
            "eval.metric: preference scores preference pairs, but objective is sft (chats);"
            " use exact, json, contains or loss"
        )
    if d.eval:
        samples: list = []
        for src in d.eval:
            path = Path(src.path) if Path(src.path).is_absolute() else recipe.base_dir / src.path
            samples += load_pairs(path, None) if pairs else load_samples(path, None, d.max_seq_len)
        return samples[:limit]
    if not d.eval_split:
        raise UserError(
            "eval.metric: the recipe holds nothing out; set data.eval or data.eval_split"
        )
    from ..train.run_data import load_data

    _, _, data = load_data(recipe)  # the prepared data (cached): its eval rows' origins
    # a raw text document's windows share its origin: it is scored once, whole
    origins = list(dict.fromkeys(s.origin for row in data.eval_rows for s in row))[:limit]
    by_file: dict[str, set[str]] = defaultdict(set)
    for o in origins:
        by_file[o.rsplit(":", 1)[0]].add(o)
    found: dict = {}
    for file, wanted in by_file.items():
        base = Path(file).parent
        options = turn_options(d, recipe.base_dir, Path(file))  # image root, Pan & Scan as trained
        for record in read_records(file):
            if record.origin in wanted and pairs:
                found[record.origin] = _pair(record, base)
            elif record.origin in wanted and document_kind(record.data) is not None:
                found[record.origin] = EvalSample(record.origin, [], "", record, base,
                                                  d.max_seq_len)  # fmt: skip
            elif record.origin in wanted:
                turns = to_turns(record, **options)
                text = "".join(p for p in turns[-1].parts if isinstance(p, str))
                found[record.origin] = EvalSample(record.origin, turns, text)
    return [found[o] for o in origins if o in found]


def held_out_prompts(recipe):
    """`eval.metric: reward`: data.eval's prompts and the run's reward functions (refusals.py
    has checked both exist), and the completion length training sampled."""
    from .rewarded import RewardEval, load_prompts

    prompts: list = []
    for src in recipe.data.eval:
        path = Path(src.path) if Path(src.path).is_absolute() else recipe.base_dir / src.path
        prompts += load_prompts(path, None)
    rewards = RewardEval.load(recipe.rl.rewards, None, 1.0, 0, recipe.base_dir)
    return (
        prompts[: recipe.eval.limit],
        rewards,
        recipe.eval.max_new_tokens or (recipe.rl.max_completion_length),
    )


def score_run(run: Path, recipe) -> dict:
    """Score the finished run; write eval.json and add the scores to its model cards."""
    metrics = list(recipe.eval.metric)
    rewards, length = None, recipe.eval.max_new_tokens
    if REWARD in metrics:
        samples, rewards, length = held_out_prompts(recipe)
    else:
        samples = held_out_samples(recipe)
    if not samples:
        raise UserError("eval.metric: no held-out samples to score")
    target = Target(str(run), "run", run)
    r = evaluate([target], samples, metrics, length, rewards=rewards)[0]
    results = [r]
    summary = {"metric": metrics, "n": len(samples), "scores": r.scores}
    if r.perplexity is not None:
        summary["perplexity"] = r.perplexity
    if r.margin is not None:
        summary["margin"] = r.margin
    write_atomic(run / "eval.json", json.dumps(summary, indent=2) + "\n")
    what = rewards.describe() if rewards is not None else ""
    print(table(results, metrics, len(samples), what), file=sys.stderr)
    lines = ["", "## Held-out evaluation (`gemma3-tune eval`)", ""]
    lines += [table(results, metrics, len(samples), what), ""]
    for card in (run / "README.md", run / "adapter" / "README.md", run / "model" / "README.md"):
        if card.is_file():
            write_atomic(card, card.read_text().rstrip("\n") + "\n" + "\n".join(lines))
    return summary
