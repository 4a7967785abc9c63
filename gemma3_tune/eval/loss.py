"""`--metric loss`: the mean token cross-entropy over the tokens training puts the loss on, and
its perplexity. A chat is rendered as training renders it (every assistant turn); a raw text
row is scored on every token, in the windows training cuts a long document into (the
recipe's `data.max_seq_len` after a run, `--max-seq-len` on the command line); a
prompt-completion row on its completion (data/documents.py, as training tokenizes them). So
a held-out domain loss before and after continued pretraining is measured on what was trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.documents import record_documents
from ..data.template import Sample, render
from .model_inputs import pixels

WINDOW = 2048  # raw text scored in windows of this many tokens unless told otherwise


@dataclass
class Windows:
    """What record_documents reads from a DataConfig, for scoring."""

    max_seq_len: int = WINDOW
    text_overlap: int = 0
    train_on: str = "assistant"


def documents(sample, tok, vision) -> list[Sample]:
    """The token documents an EvalSample is scored on (runner.EvalSample)."""
    if sample.document is None:
        return [render(sample.turns, tok, vision)]
    options = {"base": sample.base}
    return record_documents(sample.document, tok, vision, options, Windows(sample.window))


def token_loss(model, tok, samples: list, bar, vision) -> tuple[list[float], list[int]]:
    """Per sample: summed cross-entropy over its trained tokens, and their number (the mean
    over the whole set is sum / count, every token weighted alike)."""
    sums, counts = [], []
    device = next(model.parameters()).device
    with torch.no_grad():
        for s in samples:
            total, n = 0.0, 0
            for r in documents(s, tok, vision):
                ids = torch.tensor([r.input_ids], device=device)
                labels = torch.tensor([r.labels], device=device)
                k = int((labels[:, 1:] != -100).sum())
                if k:
                    loss = model(ids, pixel_values=pixels(model, r.images), labels=labels).loss
                    total, n = total + float(loss) * k, n + k
            sums.append(total)
            counts.append(n)
            bar.update(1)
    return sums, counts
