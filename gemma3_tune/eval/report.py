"""What `gemma3-tune eval` reports once every target is scored (eval/runner.py): the table with a
row per target, the samples where the targets' replies differ, the one-line JSON of scores, and
the `--out` folder (predictions.jsonl, summary.json). `reward` is reported as its columns:
each function's mean, the total, best of K (eval/rewarded.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from .metrics import GENERATION, PREFERENCE, REWARD
from .runner import EvalPair, EvalSample, TargetResult


def columns(results: list[TargetResult], metrics: list[str]) -> list[str]:
    """The metrics, `reward` spelled out as its scores (rewards/NAME..., reward, best_of_K)."""
    return list(results[0].scores) if metrics == [REWARD] else metrics


def _cell(metric: str, r: TargetResult) -> str:
    if metric == "loss":
        return f"{r.scores[metric]:.4f} (ppl {r.perplexity:.2f})"
    if metric == PREFERENCE:
        return f"{100 * r.scores[metric]:.1f}% (log-prob margin {r.margin:.2f} nats)"
    if metric in GENERATION:
        return f"{100 * r.scores[metric]:.1f}%"
    return "n/a" if r.scores[metric] is None else f"{r.scores[metric]:.4f}"  # a reward's mean


def table(results: list[TargetResult], metrics: list[str], n: int, what: str = "") -> str:
    """`what`: the first line's noun ("samples", "pairs" by default)."""
    cols = columns(results, metrics)
    head = "| target | " + " | ".join(cols) + " |"
    rule = "|---|" + "---|" * len(cols)
    rows = [f"| {r.label} | " + " | ".join(_cell(m, r) for m in cols) + " |" for r in results]
    what = what or ("pairs" if PREFERENCE in metrics else "samples")
    return "\n".join([f"{n} {what}", head, rule, *rows])


def disagreements(
    results: list[TargetResult], samples: list[EvalSample] | list[EvalPair], k: int = 3
) -> str:
    """The first k samples where the targets' replies differ."""
    if len(results) < 2 or results[0].replies[0] is None:
        return ""
    lines = []
    for i, s in enumerate(samples):
        got = [r.replies[i] for r in results]
        if len(set(got)) == 1:
            continue
        lines.append(f"{s.origin}: {s.prompt_text()[:120]!r}")
        lines.append(f"  reference: {s.reference[:200]!r}")
        lines += [f"  {r.label}: {(r.replies[i] or '')[:200]!r}" for r in results]
        if len(lines) >= 3 * (2 + len(results)):
            break
    return "\n".join(lines)


def json_line(results: list[TargetResult], metrics: list[str], n: int) -> str:
    """{"metric", "n", "scores": {target: score}} (or {target: {metric: score}} for several
    metrics); preference adds "margin": {target: mean chosen - rejected, nats}, reward
    "rewards": {target: {column: score}} (each function's mean, the total, best of K)."""
    if len(metrics) == 1:
        m = metrics[0]
        line = {"metric": m, "n": n, "scores": {r.label: r.scores[m] for r in results}}
    else:
        scores = {r.label: {m: r.scores[m] for m in metrics} for r in results}
        line = {"metric": metrics, "n": n, "scores": scores}
    if PREFERENCE in metrics:
        line["margin"] = {r.label: r.margin for r in results}
    if REWARD in metrics:
        line["rewards"] = {r.label: r.scores for r in results}
    return json.dumps(line)


def write_outputs(
    out: Path,
    results: list[TargetResult],
    samples: list[EvalSample] | list[EvalPair],
    metrics: list[str],
    force: bool = False,
    settings: dict | None = None,
) -> None:
    """predictions.jsonl (a line per sample: prompt, reference, each target's reply and
    scores; for pairs: prompt, chosen, rejected, each target's two log-probs, margin and
    score; for prompts: each target's completions, their rewards, the prompt's scores) and
    summary.json (with `settings`: how the scores were made), in `out` (staged: nothing
    half-written)."""
    from ..outputs import staged_dir

    cols = columns(results, metrics)
    with staged_dir(out, force) as tmp:
        with open(tmp / "predictions.jsonl", "w") as f:
            for i, s in enumerate(samples):
                targets = {r.label: _per_sample(r, i, cols) for r in results}
                f.write(json.dumps({**s.describe(), "targets": targets}) + "\n")
        summary = {
            "n": len(samples),
            "metrics": metrics,
            "scores": {r.label: r.scores for r in results},
            "perplexity": {r.label: r.perplexity for r in results if r.perplexity is not None},
        }
        if PREFERENCE in metrics:
            summary["margin"] = {r.label: r.margin for r in results}
        summary |= settings or {}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _per_sample(r: TargetResult, i: int, metrics: list[str]) -> dict:
    scores = {m: r.per_sample[m][i] for m in metrics}
    if r.logps:  # a pair: the two documents' summed reply log-probs
        c, rej = r.logps[i]
        return {"chosen_logp": c, "rejected_logp": rej, "margin": c - rej, **scores}
    if r.completions:  # a prompt: its completions, each with its rewards
        return {"completions": r.completions[i], **scores}
    return {"reply": r.replies[i], **scores}
