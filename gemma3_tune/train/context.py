"""`training.context_parallel: N`: each packed row is cut into N consecutive shards, one per rank
of a context-parallel group; data parallelism (DDP or DeepSpeed ZeRO) runs across the groups.

The model moves the keys (model/context_parallel.py); this module gives it its shard:
- groups: consecutive ranks form a group (on a node, neighbours, so the halo's P2P stays on
  the node's links);
- the same row on every rank of a group: the train and eval samplers hand each row out N
  times in a row, so that accelerate's batch-by-rank split gives a group's ranks the same one
  (one row per micro-batch: a larger one would put a last, partial batch's copies in one
  batch; refusals.py asks for micro_batch_size 1, and grad_accum makes the batch);
- each rank's shard of the batch (`shard_batch`): labels shifted on the whole row (the last
  token of a shard predicts the first of the next), the images whose blocks lie in the shard
  (a boundary never cuts an image block: it moves back to the block's start);
- the loss: HF's Trainer counts the labelled tokens of the step over all ranks; a group's
  ranks hold the same rows, so the count is divided by N (`Trainer.get_cp_size`), and each
  rank's share is its shard's sum over the row's count: the ranks' shares add up to the
  row's mean, and the gradients that data parallelism averages to one process's. DPO and
  ORPO sum each document's log-prob over the group in the model (context_parallel.py);
  distillation's cached targets are cut to the shard here (`_shard_targets`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler

from ..errors import UserError
from ..model.context_parallel import ContextGroup

IGNORE = -100


def make_group(n: int) -> ContextGroup | None:
    """This rank's group of `n` consecutive ranks (None for n = 1). Every rank creates every
    group, as torch.distributed requires."""
    if n == 1:  # n divides the world size: refusals.py checked it before anything loaded
        return None
    world, rank, mine = dist.get_world_size(), dist.get_rank(), None
    for start in range(0, world, n):
        group = dist.new_group(list(range(start, start + n)))
        if start <= rank < start + n:
            mine = group
    return ContextGroup(mine, rank % n, n)


def boundaries(is_img: Tensor, n: int) -> list[int]:
    """Where the n shards of rows `[B, T]` start and end: T * i / n, each moved back to the
    start of an image block it would cut in any row. Image tokens next to each other are one
    block (the template puts tokens between two images)."""
    t = is_img.shape[1]
    cuts = torch.zeros(t + 1, dtype=torch.bool)
    cuts[1:t] = (is_img[:, 1:] & is_img[:, :-1]).any(0).cpu()  # cut before c splits a block
    out = [0]
    for i in range(1, n):
        c = round(t * i / n)
        while cuts[c]:
            c -= 1
        if c <= out[-1]:  # only where an image block is longer than a shard (not at W >= 512)
            raise UserError(
                f"training.context_parallel: {n} shards of {t} tokens: an image block spans a"
                f" whole shard, which cannot be cut; raise data.max_seq_len or lower"
                f" training.context_parallel"
            )
        out.append(c)
    return [*out, t]


def shard_batch(batch: dict, cg: ContextGroup, image_token_id: int | None) -> dict:
    """This rank's shard of a collated batch (see the module docstring). The collator's
    `scored` positions are the whole row's: the model finds its shard's itself."""
    ids = batch["input_ids"]  # [B, T]
    b, t = ids.shape
    is_img = ids == image_token_id if image_token_id is not None else torch.zeros_like(ids).bool()
    a, z = boundaries(is_img, cg.size)[cg.rank : cg.rank + 2]
    out = {k: v for k, v in batch.items() if k != "scored"}
    out["input_ids"], out["position_ids"] = ids[:, a:z], batch["position_ids"][:, a:z]
    if "labels" in batch:
        targets = torch.full_like(batch["labels"], IGNORE)
        targets[:, :-1] = batch["labels"][:, 1:]
        out["labels"] = targets[:, a:z]
        if "teacher_token" in batch:  # a distillation cache's targets, the whole rows'
            out.update(_shard_targets(batch, targets, a, z))
    starts = is_img.clone()
    starts[:, 1:] &= ~is_img[:, :-1]  # [B, T]: the first token of each image block
    number = starts.reshape(-1).long().cumsum(0).view(b, t) - 1  # row-major image index
    mine = number[:, a:z][starts[:, a:z]]  # this shard's images, in the order it meets them
    for key in ("pixel_values", "vision_features"):
        if batch.get(key) is not None:
            out[key] = batch[key][mine.to(batch[key].device)]
    return out


def _shard_targets(batch: dict, targets: Tensor, a: int, z: int) -> dict:
    """The cached soft targets (data/collate.py: entries grouped by scored token, in row-major
    order of the whole rows' scored targets) of the shard's scored targets `[a, z)`, renumbered
    from 0: the shard's targets keep their row-major order, so the entries keep theirs."""
    scored = targets != IGNORE  # [B, T]
    inside = torch.zeros_like(scored)
    inside[:, a:z] = True
    mine = inside[scored]  # [K] bool: whole-row scored token k lies in this shard
    new_index = mine.long().cumsum(0) - 1  # [K]: its index among the shard's scored tokens
    token = batch["teacher_token"]  # [E]
    keep = mine.to(token.device)[token]  # [E]
    return {
        "teacher_ids": batch["teacher_ids"][keep],
        "teacher_weights": batch["teacher_weights"][keep],
        "teacher_token": new_index.to(token.device)[token[keep]],
    }


@torch.no_grad()
def context_eval(model, shard: dict, cg: ContextGroup):
    """An evaluation batch's loss on every rank of the group: the rows' mean, as one process
    computes it (each shard's sum over the rows' count, summed over the group). The Trainer
    averages the ranks' values, so the groups' rows count once each. (SFT's and
    distillation's evaluation; DPO's and ORPO's pair losses are the group's already.)"""
    count = (shard["labels"] != IGNORE).sum()
    dist.all_reduce(count, group=cg.group)
    outputs = model(**shard, num_items_in_batch=count)
    dist.all_reduce(outputs["loss"], group=cg.group)
    return outputs


class RepeatForContext(Sampler):
    """A sampler's indices, each handed out `n` times in a row: with one row per micro-batch
    (refusals.py), accelerate gives process p the p-th row of every `world`, so the `n`
    consecutive ranks of a context-parallel group get the same row, the groups different ones."""

    def __init__(self, inner, n: int):
        self.inner, self.n = inner, n

    def __len__(self) -> int:
        return len(self.inner) * self.n

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __iter__(self):
        for i in self.inner:
            for _ in range(self.n):
                yield i


def check_rows(max_seq_len: int, n: int, window: int) -> None:
    """A sliding layer's halo comes from one neighbour: every shard needs W - 1 tokens."""
    if n > 1 and max_seq_len // n < window - 1:
        raise UserError(
            f"training.context_parallel: {n} shards of data.max_seq_len {max_seq_len} are"
            f" {max_seq_len // n} tokens, shorter than a sliding layer's halo ({window - 1});"
            f" use data.max_seq_len >= {n * (window - 1)}, or a smaller context_parallel"
        )


def plan(n: int, row: int, micro_batch: int, config, dtype_bytes: int) -> str:
    """The run's first line under context parallelism: the shard, the halo, and the bytes a
    rank sends per micro-batch, per layer type (forward and backward; model's `traffic`)."""
    from ..model.context_parallel import GLOBAL, SLIDING, traffic

    t = traffic(config, row, n, dtype_bytes, micro_batch)
    ours, ring = t["ours"], t["ring"]
    return (
        f"context parallel: {n} shards of {row // n} tokens per row; halo"
        f" {config.sliding_window - 1} tokens; per rank and micro-batch, sliding layers send"
        f" {_mb(ours[SLIDING])} (ring attention: {_mb(ring[SLIDING])}), global layers"
        f" {_mb(ours[GLOBAL])} (ring: {_mb(ring[GLOBAL])})"
    )


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.2f} MiB"


def context_group(recipe, model) -> ContextGroup | None:
    """Sets up `training.context_parallel` for a built model (`model.context`): the group, the
    shard check, and the plan printed once."""
    import sys

    from .distributed import is_main_process

    n = recipe.training.context_parallel
    c = model.config
    check_rows(recipe.data.max_seq_len, n, c.sliding_window)
    group = make_group(n)
    model.context = group
    if group is not None and is_main_process():
        dtype_bytes = model.get_input_embeddings().weight.element_size()
        micro = recipe.training.micro_batch_size
        print(plan(n, recipe.data.max_seq_len, micro, c, dtype_bytes), file=sys.stderr)
    return group
