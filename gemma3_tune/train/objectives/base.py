"""The interface every training objective implements (one module each, listed in __init__.py).

An objective answers, in this order of a run:
1. `refuse(recipe)`: the settings it cannot train with, one line each (refusals.py calls it
   with the other refusals, before the data or any model loads);
2. `prepare()`: the tokenizer, config and prepared data, plus whatever must exist before the
   trained model loads, so that two models are never in memory at once (a teacher's targets,
   a reference model's log-probs, both cached);
3. `attach(model)`: anything that needs the trained model itself (QAT's self-teacher);
4. `row_fields(rows, split)`: what each row of a split carries besides its tokens (the
   collator batches it), and `train_sampler(rows, args)`: the order rows are drawn in;
5. `loss(trainer, model, inputs, rows, num_items)`: the micro-batch's loss and the model's
   outputs, keeping whatever it reports since the last log;
6. `train_logs(steps)` and `eval_logs(eval_loss)`: what it adds to the train and eval logs.

The loop (loop.py) calls only these, so it never branches on an objective's name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..batches import RowFields
from ..recipe import Recipe


class Objective:
    """What every objective shares: the run's data, nothing prepared beforehand, nothing
    attached or carried per row, nothing logged. A subclass writes `loss` and overrides the
    rest where it differs."""

    name = ""
    log_prefixes: tuple[str, ...] = ()  # what train_logs adds, kept in metrics.jsonl

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    @staticmethod
    def refuse(recipe: Recipe) -> None:
        """Raise UserError for a setting this objective cannot train with."""

    def prepare(self):
        """(tokenizer, model config, prepared data), before the trained model loads."""
        from ..run_data import load_data

        return load_data(self.recipe)

    def attach(self, model) -> None:
        """Called once the trained model is built (adapters on), before the Trainer."""

    def row_fields(self, rows, split: str) -> RowFields:
        """What each row of `split` ("train" or "eval") carries besides its tokens; a field
        named `labels` replaces the row's labels (QAT's every-position targets)."""
        return {}

    def train_sampler(self, rows: int, args):
        """The order the Trainer draws the `rows` training rows in; None: its own (a seeded
        shuffle per epoch)."""
        return None

    def loss(self, trainer, model, inputs: dict, rows, num_items) -> tuple:
        """(loss, outputs) of one micro-batch, already scaled for gradient accumulation as
        the HF Trainer expects; `rows`: the prepared row of each batch row (a tensor)."""
        raise NotImplementedError

    def train_logs(self, steps: int) -> dict:
        """Added to each train log: means over the `steps` optimizer steps since the last."""
        return {}

    def eval_logs(self, eval_loss: float) -> dict:
        """Added to each eval log."""
        return {}


def mean_stats(
    stats: list[dict[str, torch.Tensor]],
    prefix: str = "",
    skip_nan: bool = False,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """The mean of each stat over the micro-batches since the last log (one host read);
    `skip_nan`: a NaN (a stat that had nothing to average in a micro-batch) is left out;
    `reduce`: sums the `[2, K]` sums and counts over the ranks (distributed.sum_across_ranks),
    so the mean is over every rank's micro-batches (every rank must call it, as TRL gathers)."""
    if not stats:
        return {}
    keys = list(stats[0])
    device = stats[0][keys[0]].device  # stats on the host join it: still one read at the end
    values = torch.stack([torch.stack([s[k].float().to(device) for k in keys]) for s in stats])
    ok = ~values.isnan() if skip_nan else torch.ones_like(values, dtype=torch.bool)
    totals = torch.stack([torch.where(ok, values, 0.0).sum(0), ok.sum(0).float()])  # [2, K]
    if reduce is not None:
        totals = reduce(totals)
    means = (totals[0] / totals[1]).tolist()  # 0 / 0: NaN, as nanmean of nothing
    return {prefix + k: v for k, v in zip(keys, means, strict=True)}
