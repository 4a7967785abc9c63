"""Supervised fine-tuning: the model's own chunked cross-entropy on the labelled tokens
(model/loss.py), computed the HF Trainer's way; perplexity at evaluation."""

from __future__ import annotations

import math

from .base import Objective


class SFT(Objective):
    name = "sft"

    def loss(self, trainer, model, inputs: dict, rows, num_items) -> tuple:
        """The plain Trainer's compute_loss (TRL's would ask for full logits to count token
        accuracy): the model computes its loss from the batch's labels. Evaluating a
        context-parallel shard: the rows' mean on every rank of the group (context_eval)."""
        from transformers import Trainer

        if trainer.context is not None and not model.training:
            from ..context import context_eval

            outputs = context_eval(model, inputs, trainer.context)
            return outputs.loss, outputs
        return Trainer.compute_loss(trainer, model, inputs, True, num_items)

    def eval_logs(self, eval_loss: float) -> dict:
        return {"eval_perplexity": math.exp(min(eval_loss, 50.0))}
