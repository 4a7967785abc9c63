"""`rl.num_iterations` (mu) > 1: each generation batch trains `mu` optimizer steps, as TRL's
GRPOTrainer does. Two pieces make that happen without touching the loop's order of work:

- `RepeatSampler` gives the Trainer's DataLoader each optimizer step's prompts (per-device batch
  x processes x accumulation steps) `mu` times in a row, so every process sees the same
  micro-batches in the same order on each of the `mu` steps (accelerate deals the batches to the
  processes in turn, as for any sampler).
- `GenerationBuffer` keeps each micro-batch's rollout, with its old (and reference) log-probs
  from the step that generated it, for the `mu - 1` steps that reuse it.

The buffer is not checkpointed: `refuse` asks for `training.save_steps` divisible by mu, so a
resumed run always starts a fresh generation, and equals an unbroken one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Sampler


class RepeatSampler(Sampler[int]):
    """Row numbers: a permutation per epoch (seeded by seed and epoch), cut into chunks of one
    optimizer step's prompts, each chunk repeated `repeats` times. A last chunk shorter than a
    step is left out (TRL's RepeatSampler does the same); `dropped` counts its rows."""

    def __init__(self, rows: int, chunk: int, repeats: int, seed: int):
        self.rows, self.chunk, self.repeats, self.seed = rows, chunk, repeats, seed
        self.epoch = 0

    @property
    def dropped(self) -> int:
        return self.rows % self.chunk

    def set_epoch(self, epoch: int) -> None:  # accelerate calls it at each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.rows - self.dropped) * self.repeats

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.rows, generator=g).tolist()
        for start in range(0, self.rows - self.dropped, self.chunk):
            chunk = order[start : start + self.chunk]
            for _ in range(self.repeats):
                yield from chunk


@dataclass
class Generated:
    """One micro-batch's rollout and the log-probs the steps that reuse it need."""

    rows: list[int]
    rollout: object  # grpo.Rollout
    old: Tensor  # [N, T] log-probs at generation (the policy before this cycle's updates)
    ref: Tensor | None  # [N, T] the reference's, when beta > 0


class GenerationBuffer:
    """The current cycle's rollouts, by micro-batch index within the optimizer step."""

    def __init__(self, repeats: int):
        self.repeats = repeats
        self._step = -1
        self._micro = -1
        self._kept: dict[int, Generated] = {}

    def position(self, step: int) -> tuple[int, int, int]:
        """(the cycle's first step, this micro-batch's index in the step, iteration in the
        cycle) of the next training micro-batch; a new cycle forgets the last one's rollouts."""
        self._micro = self._micro + 1 if step == self._step else 0
        self._step = step
        iteration = step % self.repeats
        if iteration == 0 and self._micro == 0:
            self._kept = {}
        return step - iteration, self._micro, iteration

    def keep(self, micro: int, generated: Generated) -> None:
        self._kept[micro] = generated

    def reuse(self, micro: int, rows: list[int]) -> Generated:
        g = self._kept.get(micro)
        if g is None or g.rows != rows:
            raise RuntimeError(
                f"rl.num_iterations: micro-batch {micro} of this cycle has rows {rows}, but the"
                f" generation kept {None if g is None else g.rows}: the sampler and the buffer"
                " disagree"
            )
        return g
