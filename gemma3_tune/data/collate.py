"""Turning rows of samples into model batches.

A row is one or more samples laid end to end (packed) or a single sample. Every batch is
right-padded to its longest row, or, with `bucket_to` set, up to the next length bucket; the
padding is a document of its own (positions from 0), with `<pad>` ids and no loss, so it never
touches real tokens.

Why buckets: a compiled model (torch.compile, FlexAttention) specialises on the batch length.
Unpacked chat batches have a new length almost every step; padded up to 128, 256, 512, ...
(capped at max_seq_len) they take at most ceil(log2(max_seq_len / 128)) + 1 lengths, so the
compiled code is reused after the first few steps. With `rows_to` set, a short batch (the last
of an epoch, or of the evaluation set) also gets rows of padding up to `rows_to`, so the batch
size never changes either: the number of compiled graphs is known before the run (see
`gemma3_tune.model.gemma3.flex_graph_budget`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .template import IGNORE, Sample

SMALLEST_BUCKET = 128


def bucket_length(n: int, max_len: int) -> int:
    """The smallest of 128, 256, 512, ... that holds n tokens, capped at max_len (a row longer
    than max_len keeps its length: the data pipeline never makes one)."""
    b = SMALLEST_BUCKET
    while b < n:
        b *= 2
    return max(n, min(b, max_len))


def bucket_lengths(max_len: int) -> list[int]:
    """Every length `bucket_length` gives for rows up to max_len: 128, 256, ..., max_len."""
    return sorted({bucket_length(n, max_len) for n in range(1, max_len + 1)})


def concat_row(samples: Sequence[Sample]) -> dict[str, list]:
    """Lay samples end to end; positions restart at 0 for each (and at a pair's second
    document)."""
    ids, labels, pos, images = [], [], [], []
    for s in samples:
        ids += s.input_ids
        labels += s.labels
        if s.split:
            pos += list(range(s.split)) + list(range(len(s) - s.split))
        else:
            pos += list(range(len(s)))
        images += s.images
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "image_refs": images}


def row_features(samples: Sequence[Sample]) -> dict[str, list]:
    """One prepared row as the collator takes it: concat_row, images as plain dicts."""
    r = concat_row(samples)
    r["image_refs"] = [{"path": im.path, "views": im.views} for im in r["image_refs"]]
    return r


def every_position(features: dict[str, list], skip: frozenset[int]) -> list[int]:
    """Labels that make every position a target, for distilling a model's whole distribution
    (QAT's `target: teacher`): each token is a label except a document's first (position 0:
    nothing in its document predicts it; the previous document's last token must not) and the
    `skip` ids (padding, image soft tokens: placeholders, not text)."""
    ids, pos = features["input_ids"], features["position_ids"]
    return [t if p and t not in skip else IGNORE for t, p in zip(ids, pos, strict=True)]


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, T] -> `[K]` int64: the flat indices into `[B * T]` of the positions the loss
    scores, those whose next label is not IGNORE (the model shifts labels so that position t
    predicts label t + 1; the last position predicts nothing), in row-major order.

    Why here: the model's loss projects only these rows, and finding them on the device is a
    host sync (`nonzero`) that stalls a GPU's launch queue once a step. The collator has the
    labels on the CPU already, so it finds them for free."""
    scored = torch.zeros_like(labels, dtype=torch.bool)  # [B, T]
    scored[:, :-1] = labels[:, 1:] != IGNORE
    return scored.reshape(-1).nonzero()[:, 0]


class Collator:
    """rows -> {input_ids, labels, position_ids [B, T]; scored [K] (`scored_positions`); and,
    when there are images, either pixel_values [N, 3, S, S] or (from the feature cache)
    vision_features [N, mm_tokens, Dv]}.

    `load_image(image_ref) -> Tensor[views, ...]` is called for each image in row order.
    `bucket_to` (max_seq_len) pads every batch to a length bucket (see `bucket_length`), and
    `rows_to` (the micro-batch size) a short batch up to that many rows, all padding.
    """

    def __init__(
        self,
        pad_id: int,
        load_image: Callable | None = None,
        image_key: str = "pixel_values",
        bucket_to: int | None = None,
        rows_to: int | None = None,
        validate: Callable[[dict], None] | None = None,
    ):
        self.pad_id = pad_id
        self.load_image = load_image
        self.image_key = image_key
        self.bucket_to = bucket_to
        self.rows_to = rows_to
        self.validate = validate  # called on each CPU batch (the trainer checks image blocks)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        t = longest if self.bucket_to is None else bucket_length(longest, self.bucket_to)
        n_rows = max(len(rows), self.rows_to or 0)
        ids = torch.full((n_rows, t), self.pad_id, dtype=torch.long)
        labels = torch.full((n_rows, t), IGNORE, dtype=torch.long)
        pos = torch.arange(t).repeat(n_rows, 1)  # padding rows: one document of padding each
        pixels = []
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[b, :n] = torch.tensor(r["input_ids"])
            labels[b, :n] = torch.tensor(r["labels"])
            pos[b, :n] = torch.tensor(r["position_ids"])
            pos[b, n:] = torch.arange(t - n)  # the padding is its own document
            if self.load_image is not None:
                pixels += [self.load_image(img) for img in r.get("image_refs", [])]
        batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
        batch["scored"] = scored_positions(labels)  # the model's loss takes it: no host sync
        if all("row" in r for r in rows):  # training rows say which they are (trainer.py)
            batch["row_ids"] = torch.tensor([r["row"] for r in rows])
        if pixels:
            batch[self.image_key] = torch.cat(pixels)
        if rows and all("teacher" in r for r in rows):
            batch.update(teacher_batch(rows))
        if rows and all("reference" in r for r in rows):  # DPO: [pairs, 2] in row order
            batch["ref_logps"] = torch.from_numpy(
                np.concatenate([np.asarray(r["reference"]).reshape(-1, 2) for r in rows])
            ).float()
        if self.validate is not None:
            self.validate(batch)
        return batch


def teacher_batch(rows: list[dict]) -> dict[str, torch.Tensor]:
    """The rows' cached teacher targets (data/teacher_cache.py) as SoftTargets takes them:
    teacher_ids, teacher_weights [E] and teacher_token [E], the index of each entry's scored
    token among the batch's (row-major, as the model flattens them). Each row must have one
    target per scored position (a label after its first token): a cache that does not match its
    rows is an error, never a silent misalignment."""
    ids, weights, counts = [], [], []
    for r in rows:
        i, w, c = r["teacher"]
        want = sum(1 for x in r["labels"][1:] if x != IGNORE)
        if len(c) != want:
            raise RuntimeError(
                f"teacher cache: row {r.get('row')} has targets for {len(c)} tokens, its labels"
                f" score {want}; delete the teacher cache folder to rebuild it"
            )
        ids.append(np.asarray(i))
        weights.append(np.asarray(w))
        counts.append(np.asarray(c))
    per_token = torch.from_numpy(np.concatenate(counts).astype(np.int64))
    return {
        "teacher_ids": torch.from_numpy(np.concatenate(ids).astype(np.int64)),
        "teacher_weights": torch.from_numpy(np.concatenate(weights).astype(np.float32)),
        "teacher_token": torch.repeat_interleave(torch.arange(len(per_token)), per_token),
    }
