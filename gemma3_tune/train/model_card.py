"""The run's README.md: what was trained, on what, how it went, and how to use it.

TRL and peft write generic cards ("fine-tuned version of [None](https://huggingface.co/None)",
pages of "[More Information Needed]"); ours is built from the recipe, the data report and
metrics.jsonl, and is rewritten at every checkpoint and at the end of the run. The adapter (or
model) folder gets the same card, since that folder is what people share.

Paths (base model, data, the run in the commands) are written as the recipe has them, like the
recipe block at the end of the card: relative ones are relative to the folder `train` ran in,
and no absolute path of the training machine ends up in a shared card unless the recipe had it.
"""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from .adapters import trains_embeddings
from .metrics import read_metrics
from .recipe import Recipe, recipe_to_yaml


def _method(recipe: Recipe) -> str:
    lo = recipe.lora
    extras = [x for x, on in (("DoRA", lo.use_dora), ("rsLoRA", lo.use_rslora)) if on]
    targets = lo.targets if isinstance(lo.targets, str) else ", ".join(lo.targets)
    lora = f"r {lo.r}, alpha {lo.alpha:g}, dropout {lo.dropout:g}, targets {targets}"
    lora += "".join(f", {x}" for x in extras)
    described = {
        "lora": f"LoRA adapter ({lora})",
        "qlora": f"QLoRA adapter on 4-bit NF4 base weights ({lora})",
        "full": "full fine-tune (every weight trained)",
        "none": "multimodal projector only",
    }[recipe.method]
    if recipe.train_projector and recipe.method != "none":
        described += ", plus the multimodal projector"
    if recipe.method == "full" and not trains_embeddings(recipe):
        described += ", the embedding frozen"
    elif recipe.method != "full" and trains_embeddings(recipe):
        described += ", plus the tied embedding (LM head)"
    return described


def _objective(recipe: Recipe) -> str:
    """SFT, or distillation with its teacher and settings (train/objectives/distill.py)."""
    d, q = recipe.distill, recipe.qat
    if q is not None:
        emb = q.format if q.embeddings == "same" else q.embeddings
        how = (
            "distilled from the unquantized checkpoint it started from"
            if q.target == "teacher"
            else "labels' CE"
        )
        return (
            f"quantization-aware training for {q.format} GGUF (decoder linears through ggml's"
            f" exact {q.format} round trip, embedding {emb}; {how}); export with"
            f" `--format gguf --quantize {q.format}`"
        )
    if recipe.objective == "dpo":
        pr = recipe.preference
        smooth = f", label smoothing {pr.label_smoothing:g}" if pr.label_smoothing else ""
        return (
            f"DPO ({pr.loss} loss, beta {pr.beta:g}{smooth}) on preference pairs, reference"
            f" `{pr.reference}` (its log-probs computed before training)"
        )
    if recipe.objective == "orpo":
        return f"ORPO (lambda {recipe.preference.orpo_lambda:g}) on preference pairs, no reference"
    if d is None:
        return "SFT: cross-entropy on the labels"
    mix = f"alpha {d.alpha:g}" + (f", temperature {d.temperature:g}" if d.temperature != 1 else "")
    return (
        f"distillation from `{d.teacher}`: {d.samples} {d.mode} teacher ids per token ({mix}),"
        f" teacher {'cached before training' if d.cache else 'run in each step'}"
    )


def model_card(recipe: Recipe, out: Path, data: dict, step: int, max_steps: int, done: bool) -> str:
    """Markdown with a YAML header (as on the Hugging Face Hub). `out` is the run folder;
    `data` is the data report's summary; metrics come from out/metrics.jsonl as it stands now."""
    adapter = recipe.method in ("lora", "qlora")
    lines = [
        *_front_matter(recipe, out, data, adapter),
        *_facts(recipe, data, step, max_steps, done),
        *_progress(read_metrics(out / "metrics.jsonl")),
        *_usage(recipe, adapter),
    ]
    return "\n".join(lines)


def _front_matter(recipe: Recipe, out: Path, data: dict, adapter: bool) -> list[str]:
    """The YAML header the Hub reads, the title and the one-line description."""
    tags = ["gemma3", "gemma3-tune", recipe.method] + (["vision"] if data.get("images") else [])
    return [
        "---",
        f"base_model: {recipe.model.path}",
        f"library_name: {'peft' if adapter else 'transformers'}",
        "tags:",
        *[f"- {x}" for x in tags],
        "---",
        "",
        f"# {out.name}",
        "",
        f"A {_method(recipe)} of the Gemma 3 model `{recipe.model.path}`, trained with gemma3-tune"
        f" {__version__}.",
        "",
    ]


def _facts(recipe: Recipe, data: dict, step: int, max_steps: int, done: bool) -> list[str]:
    """The table's first rows: status, what was trained how, on what data, on what schedule."""
    t, d = recipe.training, recipe.data
    sources = ", ".join(s.path for s in d.train)
    status = (
        f"complete: {step} steps"
        if done
        else f"in progress: step {step} of {max_steps} (this card is rewritten at each checkpoint)"
    )
    return [
        "| | |",
        "|---|---|",
        f"| status | {status} |",
        f"| base model | `{recipe.model.path}` |",
        f"| method | {_method(recipe)} |",
        f"| objective | {_objective(recipe)} |",
        f"| data | {sources} |",
        f"| samples | {data.get('samples', 0):,} train, {data.get('eval_samples', 0):,} eval;"
        f" {data.get('truncated', 0):,} truncated, {data.get('dropped', 0):,} dropped at"
        f" max_seq_len {d.max_seq_len} |",
        f"| tokens | {data.get('tokens', 0):,} per epoch, {data.get('trainable_tokens', 0):,}"
        f" with loss ({d.train_on}); {data.get('rows', 0):,} rows"
        f" ({'packed' if d.packing else 'padded'}) |",
        f"| schedule | lr {t.lr:g} ({t.lr_scheduler}, {t.warmup_steps} warmup steps), micro batch"
        f" {t.micro_batch_size} x grad_accum {t.grad_accum}, seed {t.seed} |",
    ]


def _progress(rows: list[dict]) -> list[str]:
    """The table's last rows, from metrics.jsonl: the train loss from its first logged step to
    its last (with the distillation and preference terms where logged), the last eval loss."""
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    lines = []
    if train:
        last = train[-1]
        lines.append(
            f"| train loss | {train[0]['loss']:.4f} at step {train[0]['step']} ->"
            f" {last['loss']:.4f} at step {last['step']} ({last.get('tokens') or 0:,} tokens) |"
        )
        if "kd_loss" in last:
            lines.append(
                f"| distillation | kd_loss {train[0]['kd_loss']:.4f} -> {last['kd_loss']:.4f},"
                f" ce_loss {train[0]['ce_loss']:.4f} -> {last['ce_loss']:.4f} |"
            )
        if "rewards/accuracies" in last:
            lines.append(
                f"| preference | reward accuracy {last['rewards/accuracies']:.2f}, reward margin"
                f" {last['rewards/margins']:.4f} (beta-scaled log-ratio) at step {last['step']} |"
            )
    if evals:
        last = evals[-1]
        if "eval_perplexity" in last:
            how = f"perplexity {last['eval_perplexity']:.2f}"
        else:
            how = (
                f"reward accuracy {last.get('eval_rewards/accuracies', 0):.2f}, reward margin"
                f" {last.get('eval_rewards/margins', 0):.4f} (beta-scaled log-ratio)"
            )
        lines.append(f"| eval loss | {last['eval_loss']:.4f} ({how}) at step {last['step']} |")
    return lines


def _usage(recipe: Recipe, adapter: bool) -> list[str]:
    """Where the logs are, the commands that use the run, and the recipe that made it."""
    run = recipe.training.output_dir  # as the recipe has it, like every path in this card
    folder = "model" if recipe.method == "full" else "adapter"
    lines = [
        "",
        "Every logged step is in `metrics.jsonl` (the loss curve in `loss.png`), the data report"
        " in `data_report.json`.",
        "",
        "## Use it",
        "",
        "```bash",
        f'gemma3-tune generate {run} --prompt "Hello"',
        f"gemma3-tune export {run} --out merged                 # a merged transformers folder",
    ]
    if adapter:
        lines.append(f"gemma3-tune export {run} --out adapter --adapter-only  # a peft adapter")
    lines += [
        f"gemma3-tune export {run} --out model.gguf --format gguf  # for llama.cpp",
        "```",
        "",
        f"`{folder}/` holds the trained weights; `checkpoint-N/` are for resuming"
        " (`training.resume: true`). Paths are as written in the recipe: relative ones are"
        " relative to the folder training ran in.",
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_to_yaml(recipe).rstrip(),
        "```",
        "",
    ]
    return lines
