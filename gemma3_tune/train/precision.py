"""One precision rule for every method and launcher: trainable weights have fp32 masters, and
the forward and backward run in `model.dtype`.

Why: an AdamW update of a bf16 weight is rounded to bf16's 8 bits of mantissa. At the learning
rates adapters train with (1e-5 for the projector) most updates are smaller than half a bf16
step and vanish: measured on the tiny vision model, 10 steps of a bf16 projector moved 2.3% of
its entries. Kept in fp32, every update lands.

How, per launcher:
- one process and DDP: every trainable parameter is cast to fp32 (`prepare`), frozen
  ones stay in `model.dtype`, and the Trainer runs each step under `torch.autocast(model.dtype)`
  (its `bf16`/`fp16` flags, accelerate's mixed precision): matmuls see bf16 operands, the
  optimizer updates fp32 weights and keeps fp32 moments;
- DeepSpeed ZeRO-2/3: DeepSpeed's bf16 mode does the same by construction: the module holds bf16
  copies for compute, the optimizer holds fp32 master partitions and fp32 moments.
The weights a run saves (adapter/, model/, projector.safetensors) are the fp32 masters: the
parameters themselves, or DeepSpeed's masters gathered by `deepspeed.utils.safe_get_full_fp32_param`.
With `model.dtype: float32` (the CPU default) everything is fp32 and no autocast runs.
"""

from __future__ import annotations

import torch
from torch import nn


def prepare(model: nn.Module, dtype: torch.dtype, deepspeed: bool) -> None:
    """Give the trainable parameters their dtype before the Trainer wraps the model: fp32
    (the masters themselves) without DeepSpeed; `dtype` under DeepSpeed, which makes fp32
    masters of its own and needs its compute copies in one dtype (ZeRO-3 flattens them: peft's
    fp32 LoRA weights beside a bf16 projector copy fail its `defragment`)."""
    cast_trainable(model, torch.float32 if not deepspeed else dtype)


def cast_trainable(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every trainable floating-point parameter to `dtype` in place; returns how many were
    cast. Frozen parameters keep their dtype (they only ever run in the forward)."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


def mixed_precision_flags(dtype: torch.dtype) -> dict[str, bool]:
    """The Trainer's `bf16`/`fp16` arguments for a run in `dtype` (autocast without DeepSpeed,
    DeepSpeed's own bf16/fp16 mode with it)."""
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def trainable_fp32_state(trainer) -> dict[str, torch.Tensor]:
    """name -> fp32 CPU copy of every trainable parameter's master weight (names as in
    `trainer.model.named_parameters()`). Under DeepSpeed the module's parameters are bf16
    compute copies: the masters live in the optimizer and are gathered from it (a collective
    under ZeRO-3: every rank calls this)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in trainer.model.named_parameters():
        if not p.requires_grad:
            continue
        if trainer.is_deepspeed_enabled:
            from deepspeed.utils import safe_get_full_fp32_param

            master = safe_get_full_fp32_param(p)
        else:
            master = p.detach()
        out[name.removeprefix("module.")] = master.float().cpu()
    return out
