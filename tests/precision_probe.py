"""Train a recipe (under torchrun or alone) and write, per rank, the dtypes precision.py
promises: the module's trainable parameters, the weights the optimizer updates (its masters)
and the optimizer's state. Used by tests/test_precision.py.

    python tests/precision_probe.py RECIPE OUT_PREFIX [key=value ...]  ->  OUT_PREFIX.RANK.json
"""

from __future__ import annotations

import json
import os
import sys

import torch


def inner_optimizer(trainer) -> torch.optim.Optimizer:
    """The torch optimizer that applies the updates: under DeepSpeed, the one inside its ZeRO
    optimizer (it updates DeepSpeed's fp32 partitions); else the one accelerate wraps."""
    opt = trainer.deepspeed.optimizer if trainer.is_deepspeed_enabled else trainer.optimizer
    while not isinstance(opt, torch.optim.Optimizer) or hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def main(recipe_path: str, prefix: str, *overrides: str) -> None:
    from gemma3_tune.train.recipe import load_recipe
    from gemma3_tune.train.saving import save_final
    from gemma3_tune.train.trainer import build_trainer

    recipe = load_recipe(recipe_path, list(overrides))
    trainer, out, folder = build_trainer(recipe)
    trainer.train()
    opt = inner_optimizer(trainer)
    masters = [p for g in opt.param_groups for p in g["params"]]
    if trainer.is_deepspeed_enabled:  # ZeRO's own fp32 partitions (stage 3 swaps them in and
        zero = trainer.deepspeed.optimizer  # out of its optimizer's groups around each step)
        masters = (
            getattr(zero, "fp32_partitioned_groups_flat", None)
            or zero.single_partition_of_fp32_groups
        )
    masters = [str(p.dtype) for p in masters]
    state = [
        str(t.dtype)
        for s in opt.state.values()
        for k, t in s.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and k != "step"
    ]
    params = {n: str(p.dtype) for n, p in trainer.model.named_parameters() if p.requires_grad}
    # the dtype ZeRO accumulates gradients in across micro-batches (DeepSpeed: the model's, bf16,
    # unless the config's data_types.grad_accum_dtype says otherwise)
    accum = str(trainer.deepspeed.get_data_types()[1]) if trainer.is_deepspeed_enabled else None
    save_final(trainer, recipe, out, folder)
    rank = os.environ.get("RANK", "0")
    with open(f"{prefix}.{rank}.json", "w") as f:
        json.dump({"params": params, "masters": masters, "state": state, "grad_accum": accum}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
