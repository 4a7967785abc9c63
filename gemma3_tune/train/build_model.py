"""The model a run trains, built for its method: loaded (partitioned under ZeRO-3, quantized
tensor by tensor for QLoRA, plainly otherwise), fake-quantized for QAT, adapters applied,
trainables in their master precision, layers compiled where that pays."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..model.checkpoint import load_model
from ..model.dtypes import resolve_dtype
from . import precision, qat
from .adapters import apply_method, parameter_table, trains_embeddings, unwrap
from .args import compile_enabled
from .distributed import (
    device,
    gather_tied_embedding,
    images_needed,
    is_main_process,
    load_model_zero3,
)
from .qlora import load_quantized, write_settings
from .recipe import Recipe


def _load(recipe: Recipe, folder: Path, out: Path, ds_config: dict | None):
    """The base weights, loaded the way the method and ZeRO stage need."""
    dtype, backend = resolve_dtype(recipe.model.dtype), recipe.model.attn_backend
    if ds_config is not None:  # ZeRO-3; qlora, qat and compile: true were refused (refusals.py)
        return load_model_zero3(folder, dtype, ds_config, backend)
    if recipe.method == "qlora":  # quantized tensor by tensor while loading
        model = load_quantized(folder, dtype, device(), backend)
        if is_main_process():
            write_settings(out, dtype, torch.device(device()))
        return model
    return load_model(folder, dtype=dtype, device=device(), attn_backend=backend)


def build_model(recipe: Recipe, folder: Path, out: Path, args, objective) -> tuple:
    """(the model to train, whether its layers are compiled). `args`: the run's SFTConfig
    (it knows the DeepSpeed config); `objective` attaches to the finished model."""
    zero3 = recipe.deepspeed is not None and args.hf_deepspeed_config.is_zero3()
    torch.manual_seed(recipe.training.seed)
    model = _load(recipe, folder, out, args.hf_deepspeed_config.config if zero3 else None)
    if model.config.is_multimodal:  # ranks without images keep in step (Gemma3._stand_in)
        model.images_needed = images_needed(partitioned=zero3)
    if recipe.training.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if recipe.qat is not None:  # decoder linears fake-quantized, before peft wraps them
        qat.apply(model, recipe.qat, trains_embedding=trains_embeddings(recipe))
    torch.manual_seed(recipe.training.seed)  # LoRA init must not depend on how the model was built
    model = apply_method(model, recipe)
    if zero3 and recipe.method == "lora" and trains_embeddings(recipe):
        gather_tied_embedding(unwrap(model))  # peft's trained copy, read by the head too
    if recipe.qat is not None:
        qat.attach_lora(model)
    objective.attach(model)
    precision.prepare(model, resolve_dtype(recipe.model.dtype), recipe.deepspeed is not None)
    compiled = compile_enabled(recipe, zero3)
    if compiled:
        unwrap(model).compile_layers()
    if is_main_process():
        print(parameter_table(model), file=sys.stderr)
    return model, compiled
