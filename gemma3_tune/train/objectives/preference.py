"""`objective: dpo | orpo`: preference tuning on pairs of replies to one prompt.

The losses are preference_loss.py's (TRL's, term for term); this module is the objective
around them: its refusals, DPO's reference log-probs prepared before the policy loads
(reference.py, cached), carried with each row, and TRL's reward stats in the logs.
"""

from __future__ import annotations

import torch

from ...errors import UserError
from ...model.gemma3 import Output
from ..recipe import Recipe
from .base import Objective, mean_stats
from .preference_loss import dpo_loss, orpo_loss, pairs
from .reference import reference_logps, resolve_reference, row_reference


class Preference(Objective):
    """`objective: dpo | orpo`: pairs of documents scored per reply. DPO's reference log-probs
    are computed (and cached) before the policy loads and ride with each row."""

    log_prefixes = ("rewards/", "logps/", "nll_loss", "log_odds")  # TRL's names

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        self.name = recipe.objective
        self.reference = None  # [samples, 2] memory-mapped (DPO)
        self._stats: dict[str, list] = {"train": [], "eval": []}  # since the last log

    @staticmethod
    def refuse(recipe: Recipe) -> None:
        if recipe.distill is not None:
            raise UserError(
                f"objective: {recipe.objective} trains on preference pairs, distill: on a"
                " teacher's distribution; remove one (distil first, then tune preferences from"
                " its run)"
            )
        if recipe.qat is not None:
            raise UserError(
                f"qat cannot be combined with objective: {recipe.objective}; tune preferences"
                " first, then run QAT on the result"
            )
        if recipe.objective == "dpo":
            resolve_reference(recipe)  # a reference that does not exist: before any data work

    def prepare(self):
        """The pairs' data, and (DPO) the reference's log-probs: never both models in memory."""
        tok, cfg, data = super().prepare()
        if self.name == "dpo":
            from ...data.collate import Collator
            from ...model.dtypes import resolve_dtype
            from ..batches import pixel_loader
            from ..distributed import device

            # On CUDA, buckets: FlexAttention compiles one graph per length (collate.py)
            bucket = self.recipe.data.max_seq_len if torch.cuda.is_available() else None
            collate = Collator(tok.pad_id, pixel_loader(self.recipe, cfg), bucket_to=bucket)
            dtype = resolve_dtype(self.recipe.model.dtype)
            self.reference = reference_logps(self.recipe, data, collate, dtype, device())
        return tok, cfg, data

    def row_fields(self, rows, split: str) -> dict:
        if self.reference is None:
            return {}
        return {"reference": lambda i: row_reference(self.reference, rows, i)}

    def loss(self, trainer, model, inputs: dict, rows, num_items) -> tuple:
        """DPO (against the batch's reference log-probs) or ORPO, on the per-pair reply
        log-probs the model computes in chunks. A micro-batch's loss is its mean over pairs,
        divided by the accumulation steps (as TRL's DPOTrainer); the stats are kept for the
        next train or eval log."""
        ref = inputs.pop("ref_logps", None)
        out = model(**inputs, sequence_logps=True)
        policy, tokens = pairs(out["logps"], out["tokens"])  # [P, 2] each
        s = self.recipe.preference
        if self.name == "dpo":
            if ref is None or ref.shape != policy.shape:
                raise RuntimeError(
                    f"reference log-probs for {None if ref is None else tuple(ref.shape)}"
                    f" pairs, the batch has {tuple(policy.shape)}; delete the reference"
                    " cache folder to rebuild it"
                )
            loss, stats = dpo_loss(
                policy, ref.to(policy), tokens, s.beta, s.loss, s.label_smoothing
            )
        else:
            loss, stats = orpo_loss(policy, tokens, s.orpo_lambda)
        self._stats["train" if model.training else "eval"].append(stats)
        if model.training:  # HF divides only losses it did not see normalised: not ours
            loss = loss / trainer.current_gradient_accumulation_steps
        return loss, Output(loss=loss)

    def train_logs(self, steps: int) -> dict:
        stats, self._stats["train"] = self._stats["train"], []
        return mean_stats(stats)

    def eval_logs(self, eval_loss: float) -> dict:
        """A preference loss has no perplexity: TRL's reward stats instead."""
        stats, self._stats["eval"] = self._stats["eval"], []
        return mean_stats(stats, "eval_")
