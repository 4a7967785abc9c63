"""`gemma3-tune eval`: the command (cli.py holds its parser). Every mistake the user can fix is
refused in one line before any model loads; then the targets are scored in turn and reported.

Only light imports at the top: a refused command answers before torch is imported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError
from .metrics import METRICS, OWN_DATA, PREFERENCE, REWARD


def _metrics(args: argparse.Namespace) -> list[str]:
    metrics = list(dict.fromkeys(args.metric or ["exact"]))  # in the order given, once each
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise UserError(f"eval --metric {bad[0]}: choose from {', '.join(METRICS)}")
    alone = next((m for m in metrics if m in OWN_DATA), None)
    if alone is not None and len(metrics) > 1:
        other = next(m for m in metrics if m != alone)
        raise UserError(
            f"eval --metric {alone} scores {OWN_DATA[alone]}, --metric {other}"
            f" {OWN_DATA.get(other, 'chats')}: run them as two evals, each on its own --data"
        )
    return metrics


def _reward_options(args: argparse.Namespace, metrics: list[str]) -> None:
    """--reward, --samples, --temperature and --seed belong to --metric reward (the last two to
    --samples: greedy decoding draws nothing)."""
    sampling = {"--samples": args.samples, "--temperature": args.temperature, "--seed": args.seed}
    given = [flag for flag, value in sampling.items() if value is not None]
    if REWARD not in metrics:
        flag = "--reward" if args.reward else given[0] if given else None
        if flag is not None:
            raise UserError(
                f"eval {flag} applies to --metric reward; add --metric reward --reward SPEC, or"
                f" drop {flag}"
            )
        return
    if not args.reward:
        raise UserError(
            "eval --metric reward needs --reward SPEC (repeatable), as rl.rewards names them: a"
            " built-in such as json_valid or json_equal:COLUMN, path/file.py:function or"
            " module:function"
        )
    if args.samples is None and given:
        raise UserError(
            f"eval {given[0]} applies to sampling; add --samples K (completions per prompt), or"
            " drop it for one greedy completion per prompt"
        )
    if args.samples is not None and args.samples < 1:
        raise UserError(f"eval --samples {args.samples}: give 1 or more")
    if args.temperature is not None and not args.temperature > 0:
        raise UserError(
            f"eval --temperature {args.temperature}: give one above 0 (for greedy completions,"
            " drop --samples)"
        )


def run(args: argparse.Namespace) -> int:
    metrics = _metrics(args)
    _reward_options(args, metrics)
    if args.batch_size < 1:
        raise UserError(f"eval --batch-size {args.batch_size}: give 1 or more")
    if not Path(args.data).exists():
        raise UserError(f"eval --data {args.data}: no such file or folder")
    if args.out is not None:
        from ..outputs import refuse_existing

        refuse_existing(args.out, args.force)  # before any model loads
    from .targets import parse_target

    targets = [parse_target(t, args.adapter) for t in args.targets]
    from .report import disagreements, json_line, table, write_outputs
    from .runner import check_llama_cpp, evaluate, load_pairs, load_samples

    if args.backend == "llama.cpp":
        check_llama_cpp(targets, metrics)  # before the data is read
    rewards, what, settings = None, "", None
    if REWARD in metrics:
        from .rewarded import RewardEval, load_prompts

        rewards = RewardEval.load(
            args.reward, args.samples, args.temperature or 1.0, args.seed or 0
        )  # a missing file or function: one line, before the data is read
        samples = load_prompts(args.data, args.limit)
        what, settings = rewards.describe(), {"reward": rewards.settings(args.max_new_tokens)}
    else:
        samples = (
            load_pairs(args.data, args.limit)
            if PREFERENCE in metrics
            else load_samples(args.data, args.limit, args.max_seq_len)
        )
    results = evaluate(
        targets, samples, metrics, args.max_new_tokens, args.batch_size, args.backend, args.dtype,
        rewards,
    )  # fmt: skip
    print(table(results, metrics, len(samples), what))
    differ = disagreements(results, samples)
    if differ:
        print("\nwhere the targets disagree:\n" + differ)
    if args.out is not None:
        write_outputs(args.out, results, samples, metrics, args.force, settings)
        print(f"wrote {args.out}/predictions.jsonl and summary.json", file=sys.stderr)
    if args.json:
        print(json_line(results, metrics, len(samples)))
    return 0
