"""Every combination of recipe settings we refuse, checked in one place, one line each, before
anything heavy loads: `gemma3-tune train` calls `refuse` right after reading the recipe (before
transformers, the data or a model), and `build_trainer` again for callers that skip the CLI.
What an objective refuses is its own `refuse` (objectives/*.py), called from here.
A refusal that needs the data or the model (bad samples, a finished run) stays where those are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from .recipe import Recipe

SHIPPED_DEEPSPEED = Path(__file__).parent / "deepspeed"


def refuse(recipe: Recipe) -> None:
    from .objectives import objective_class

    _qat(recipe)
    _context_parallel(recipe)
    _embeddings(recipe)
    _reward_eval(recipe)
    objective_class(recipe).refuse(recipe)  # each objective's own (objectives/*.py)
    if zero_stage(recipe) == 3:
        _zero3(recipe)


def _context_parallel(recipe: Recipe) -> None:
    """What context parallelism (train/context.py) does not do yet, one line each."""
    n = recipe.training.context_parallel
    if n == 1:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % n:
        raise UserError(
            f"training.context_parallel: {n} does not divide the {world} processes launched;"
            f" launch a multiple of {n} (torchrun --nproc_per_node), or set a divisor of {world}"
        )
    if recipe.objective not in ("sft", "dpo", "orpo"):
        raise UserError(
            f"training.context_parallel: {n} runs objectives sft (with distill or qat), dpo and"
            f" orpo, not {recipe.objective} for now; set training.context_parallel=1 for it"
        )
    if _draws_in_step(recipe):
        raise UserError(
            f"training.context_parallel: {n} with a teacher sampled in each step: each shard"
            " would draw its own targets; set distill.cache=true (sampled once, then sharded) or"
            " distill.mode=full (qat.distribution=full)"
        )
    if recipe.training.micro_batch_size != 1:
        raise UserError(
            "training.context_parallel trains one packed row per micro-batch (the row is what"
            " the ranks share); set training.micro_batch_size=1 and raise training.grad_accum"
        )
    if recipe.training.compile is True:
        raise UserError(
            "training.compile: true with training.context_parallel: the shards' exchanges are"
            " not compiled yet; set training.compile=auto (off under context parallelism)"
        )
    if recipe.model.attn_backend == "flex":
        raise UserError(
            "model.attn_backend: flex with training.context_parallel: shards attend with SDPA's"
            " dense masks for now; set model.attn_backend=auto"
        )


def _reward_eval(recipe: Recipe) -> None:
    """`eval.metric: reward` scores held-out prompts with the run's own reward functions."""
    metrics = recipe.eval.metric
    if "reward" not in metrics:
        return
    if recipe.objective != "grpo":
        raise UserError(
            "eval.metric: reward scores prompts with rl.rewards, which only objective grpo has;"
            " use exact, json, contains or loss"
        )
    if len(metrics) > 1:
        raise UserError("eval.metric: reward scores prompts, the other metrics chats; keep one")
    if not recipe.data.eval:
        raise UserError(
            "eval.metric: reward scores the prompts of data.eval; set data.eval to a held-out"
            " prompt file"
        )


def deepspeed_config_path(recipe: Recipe) -> Path:
    """The DeepSpeed JSON a recipe names: a shipped one (zero2, zero3, zero3_offload) or a
    file, relative to the recipe."""
    ds = recipe.deepspeed
    assert ds is not None
    shipped = SHIPPED_DEEPSPEED / f"{ds}.json"
    if shipped.is_file():
        return shipped
    p = Path(ds)
    p = p if p.is_absolute() else recipe.base_dir / p
    if not p.is_file():
        raise UserError(
            f"deepspeed: {ds!r} is neither zero2, zero3, zero3_offload nor an existing .json file"
        )
    return p


def zero_stage(recipe: Recipe) -> int | None:
    """The ZeRO stage the recipe's DeepSpeed config asks for (None without DeepSpeed)."""
    if recipe.deepspeed is None:
        return None
    cfg = json.loads(deepspeed_config_path(recipe).read_text())
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def _qat(recipe: Recipe) -> None:
    q = recipe.qat
    if q is None:
        return
    if recipe.method in ("qlora", "none"):
        raise UserError(
            f"qat: method {recipe.method} does not train the decoder linears a GGUF quantizes;"
            " use method: lora or full"
        )
    if recipe.lora.use_dora and recipe.method == "lora":
        raise UserError("qat: DoRA's merged weight is not W + s B A; set lora.use_dora=false")
    if q.target == "teacher" and recipe.distill is not None:
        raise UserError(
            "qat.target: teacher distils from the model itself; remove the distill: section or"
            " set qat.target=labels (then distill.teacher teaches the quantized student)"
        )


def _draws_in_step(recipe: Recipe) -> bool:
    """Whether a teacher samples targets in each step (distill.cache false, or QAT's LoRA
    self-teacher), not the full distribution."""
    d, q = recipe.distill, recipe.qat
    if d is not None:
        return not d.cache and d.mode != "full"
    lora_teacher = q is not None and q.target == "teacher" and recipe.method != "full"
    return lora_teacher and q.distribution != "full"


def _embeddings(recipe: Recipe) -> None:
    if recipe.embedding_lr is not None and not recipe.train_embeddings:
        raise UserError("embedding_lr: set train_embeddings: true too (or remove embedding_lr)")
    if recipe.train_embeddings and recipe.method == "none":
        raise UserError(
            "train_embeddings: method none trains the projector only; use method: lora, qlora"
            " or full"
        )


def _zero3(recipe: Recipe) -> None:
    if recipe.method == "qlora":
        raise UserError("method: qlora cannot be combined with ZeRO-3; use zero2 or plain DDP")
    if recipe.qat is not None:
        raise UserError("qat cannot be combined with ZeRO-3 (partitioned weights); use zero2")
    if recipe.training.compile is True:
        raise UserError(
            "training.compile: true cannot be combined with ZeRO-3 (its weight-gathering hooks"
            " do not trace); set training.compile=false or use deepspeed: zero2"
        )
