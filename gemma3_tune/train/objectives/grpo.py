"""`objective: grpo`: reinforcement learning with verifiable rewards (GRPO, DAPO, Dr. GRPO,
BNPO, GSPO), TRL's GRPOTrainer's method with its settings' names (`rl:`).

Each micro-batch of prompts: the policy (adapter on, eval mode, no gradients) samples
`num_generations` completions per prompt with our KV-cache decoder, each prompt (its images
included) run once and its cache repeated for its samples, every draw from a generator
seeded by (seed, step, prompt row, k) so a resumed run draws what an unbroken one would; the
reward functions score them (train/rewards.py); advantages are computed per group
(grpo_loss.py); the prompt + completion documents are packed into rows with our masks and
scored by the chunked log-prob path (no `[tokens, vocab]` logits beyond one chunk), and the
clipped policy loss is TRL's. The reference for `beta > 0` is the starting model: for LoRA
the adapter switched off (no second copy).

Where ours differs from TRL's loop (the loss formulas do not): a generation batch is one
micro-batch of prompts (TRL's `steps_per_generation` = 1), so `scale_rewards: batch` and
DAPO's token normaliser span the micro-batch (times the accumulation steps), not the
optimizer step; each process generates for its own prompts, so groups never straddle
processes.

A vLLM engine can replace `rollout`'s generation on a GPU: it takes prompt ids (and images)
and returns completion ids; the weights it samples from must be the policy's (a LoRA adapter
synced per step), and the seeds are then vLLM's.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ...errors import UserError
from ...model.gemma3 import Output
from ...model.generate import generate_groups
from ..adapters import unwrap
from ..distributed import all_done, gather_to_main, sum_across_ranks
from ..recipe import Recipe
from ..refusals import zero_stage
from .base import Objective, mean_stats
from .grpo_loss import PolicyLossSettings, advantages, combine_rewards, nanstd, policy_loss
from .grpo_reuse import Generated, GenerationBuffer, RepeatSampler


@dataclass
class Rollout:
    """One micro-batch's completions, prompt-major (prompt b's k-th at b * G + k)."""

    prompts: list  # data/rl_prompts.RLPrompt, one per prompt
    completions: list[list[int]]  # ids, the stop token included when one was drawn
    truncated: Tensor  # [N] bool: cut at max_completion_length
    texts: list[str]  # the completions decoded, stop tokens dropped
    rewards: Tensor  # [N, F] (NaN: a function that does not apply)
    total: Tensor  # [N] the weighted sum over the functions (NaN: none applies)
    advantages: Tensor  # [N]
    zero_std: Tensor  # [N] bool
    features: Tensor | None  # the prompts' images through the frozen tower, once per prompt
    seconds: float  # generation and scoring


def generators(seed: int, step: int, rows: list[int], group: int, device) -> list:
    """One generator per completion, from (seed, step, prompt row, k) only: the draws do not
    depend on the batch a prompt shares or on the process that generates it."""
    out = []
    for row in rows:
        for k in range(group):
            key = ((seed * 1_000_003 + step) * 1_000_033 + row) * 131 + k
            out.append(torch.Generator(device=device).manual_seed(key % 2**63))
    return out


def _pack(prompts: list, completions: list[list[int]], group: int, pad_id: int):
    """Documents prompt + completion, one row each, right-padded: input_ids, position_ids and
    labels (the completion's tokens) `[N, L]`."""
    docs = [prompts[i // group].ids + c for i, c in enumerate(completions)]
    width = max(len(d) for d in docs)
    ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    pos = torch.zeros_like(ids)
    for i, d in enumerate(docs):
        n, p = len(d), len(prompts[i // group].ids)
        ids[i, :n] = torch.tensor(d)
        labels[i, p:n] = torch.tensor(completions[i])
        pos[i, :n] = torch.arange(n)
    return ids, pos, labels


def completion_logps(model, rollout: Rollout, pad_id: int, temperature: float) -> Tensor:
    """log p(token) of every completion token `[N, T]` (0 past a completion's end), at the
    sampling temperature (TRL divides the logits by it). The model projects only the labelled
    positions, a chunk at a time (never `[tokens, vocab]` logits)."""
    group = len(rollout.completions) // len(rollout.prompts)
    ids, pos, labels = _pack(rollout.prompts, rollout.completions, group, pad_id)
    device = next(model.parameters()).device
    extra = {}
    if rollout.features is not None:  # each prompt's image views, once per completion
        views = [sum(im.views for im in p.images) for p in rollout.prompts]
        starts = [sum(views[:b]) for b in range(len(views))]
        order = [starts[b] + j for b in range(len(views)) for _ in range(group)
                 for j in range(views[b])]  # fmt: skip
        extra["vision_features"] = rollout.features[torch.tensor(order, dtype=torch.long)]
    flat = model(
        ids.to(device), position_ids=pos.to(device), labels=labels.to(device), token_logps=True,
        temperature=temperature, **extra,
    ).logps  # [K], row-major  # fmt: skip
    lengths = torch.tensor([len(c) for c in rollout.completions])
    out = torch.zeros(len(lengths), int(lengths.max()), dtype=flat.dtype, device=device)
    mask = torch.arange(out.shape[1])[None] < lengths[:, None]
    out[mask.to(device)] = flat
    return out


class GRPO(Objective):
    name = "grpo"
    log_prefixes = (
        "reward",
        "frac_reward_zero_std",
        "completions/",
        "clip_ratio/",
        "kl",
        "generation_seconds",
        "training_seconds",
    )  # fmt: skip  TRL's names ("reward" covers reward_std and rewards/<name>/...)

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        r = recipe.rl
        self.settings = PolicyLossSettings(
            loss_type=r.loss_type,
            epsilon=r.epsilon,
            epsilon_high=r.epsilon if r.epsilon_high is None else r.epsilon_high,
            delta=r.delta,
            beta=r.beta,
            level=r.importance_sampling_level,
            max_completion_length=r.max_completion_length,
        )
        self.data = None  # data/rl_prompts.RLData
        self.rewards: list = []
        self.tok = None
        self._stats: dict[str, list] = {"train": [], "eval": []}
        self._samples: list[dict] = []  # this log's completions, for completions.jsonl
        mu = r.num_iterations
        self.buffer = GenerationBuffer(mu) if mu > 1 else None  # grpo_reuse.py
        self.reference = None  # method full with beta > 0: a frozen copy (attach)
        self._stop = None  # ZeRO-3: when decoding ends, agreed by the ranks (attach)

    @staticmethod
    def refuse(recipe: Recipe) -> None:
        r = recipe.rl
        if not r.rewards:
            raise UserError(
                "objective: grpo needs rl.rewards: path/to/file.py:name, module:name or a"
                " built-in such as json_valid"
            )
        if recipe.distill is not None or recipe.qat is not None:
            raise UserError("objective: grpo cannot be combined with distill: or qat:; remove it")
        t = recipe.training
        if r.num_iterations > 1 and t.save_steps % r.num_iterations:
            raise UserError(
                f"rl.num_iterations {r.num_iterations} trains each generation for"
                f" {r.num_iterations} steps; set training.save_steps (now {t.save_steps}) to a"
                " multiple of it, so a resumed run starts at a fresh generation"
            )
        if r.beta > 0 and recipe.method == "full" and zero_stage(recipe) == 3:
            raise UserError(
                "rl.beta > 0 with method full keeps a frozen copy of the model as the"
                " reference, which ZeRO-3 does not shard; use deepspeed zero2, method lora"
                " (the adapter off is the reference) or rl.beta=0"
            )
        if recipe.data.max_seq_len <= r.max_completion_length:
            raise UserError(
                f"data.max_seq_len {recipe.data.max_seq_len} leaves no room for a prompt beside"
                f" rl.max_completion_length {r.max_completion_length}; raise data.max_seq_len"
            )
        if recipe.data.feature_cache:
            raise UserError(
                "objective: grpo encodes each prompt's images once per group; remove"
                " data.feature_cache"
            )
        from ..rewards import load_rewards

        load_rewards(r.rewards, recipe.base_dir)  # a missing file or function: one line now

    def prepare(self):
        from ...data.dataset import vision_tokens
        from ...data.rl_prompts import read_prompts
        from ..rewards import load_rewards
        from ..run_data import tokenizer_and_config

        recipe = self.recipe
        tok, cfg = tokenizer_and_config(recipe)
        self.data = read_prompts(
            recipe.data, tok, vision_tokens(cfg), recipe.base_dir, recipe.training.seed,
            recipe.rl.max_completion_length,
        )  # fmt: skip
        if self.data.image_refs() and zero_stage(recipe) == 3:
            raise UserError(
                "objective: grpo with images under ZeRO-3 is not supported yet (each rank would"
                " run the sharded tower on its own prompts only); use deepspeed zero2"
            )
        self.rewards = load_rewards(recipe.rl.rewards, recipe.base_dir)
        self.tok = tok
        return tok, cfg, self.data

    def attach(self, model) -> None:
        """With method full and beta > 0, the reference is a frozen copy of the starting model
        (TRL loads a second copy too); LoRA and QLoRA switch the adapter off instead."""
        if zero_stage(self.recipe) == 3:  # sharded weights: every rank decodes as long
            self._stop = all_done()
        if self.settings.beta > 0 and self.recipe.method == "full":
            self.reference = copy.deepcopy(unwrap(model)).requires_grad_(False).eval()

    def train_sampler(self, rows: int, args):
        """num_iterations > 1: each optimizer step's prompts, `mu` times in a row."""
        mu = self.recipe.rl.num_iterations
        if mu == 1:
            return None
        step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
        sampler = RepeatSampler(rows, step, mu, args.seed)
        if sampler.dropped and args.process_index == 0:
            print(
                f"rl.num_iterations {mu}: {sampler.dropped} of {rows} prompts left out of each"
                f" epoch (the last {step} prompts per step do not fill a step; TRL drops them too)",
                file=sys.stderr,
            )
        return sampler

    # -- a micro-batch -----------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, model, prompts: list, rows: list[int], step: int, inputs: dict) -> Rollout:
        """Sample, score and compute the advantages of one micro-batch of prompts."""
        from ..rewards import completion_texts, score

        t0, r = time.perf_counter(), self.recipe.rl
        base = unwrap(model)
        device = next(model.parameters()).device
        features = None
        if "pixel_values" in inputs:  # the prompts' images, through the tower once
            w = next(base.vision_tower.parameters())
            features = base.vision_features(inputs["pixel_values"].to(device, w.dtype))
        was_training = model.training
        model.eval()
        try:
            completions, truncated = generate_groups(
                base, [p.ids for p in prompts], r.num_generations,
                generators(self.recipe.training.seed, step, rows, r.num_generations, device),
                max_new_tokens=r.max_completion_length, stop_ids=self.tok.stop_ids(),
                pad_id=self.tok.pad_id, temperature=r.temperature, top_p=r.top_p,
                top_k=r.top_k, vision_features=features, stop=self._stop,
            )  # fmt: skip
        finally:
            model.train(was_training)
        as_trl, texts = completion_texts(self.tok, prompts, completions)
        per_prompt = [p for p in prompts for _ in range(r.num_generations)]
        scores = score(
            self.rewards,
            [p.prompt for p in per_prompt],
            as_trl,
            completions,
            [p.columns for p in per_prompt],
            [p.origin for p in per_prompt],
        )
        weights = torch.tensor(r.reward_weights or [1.0] * len(self.rewards))
        total = combine_rewards(scores, weights)
        adv, zero_std = advantages(total, r.num_generations, r.scale_rewards)
        cut = torch.tensor(truncated)
        return Rollout(prompts, completions, cut, texts, scores, total, adv, zero_std, features,
                       time.perf_counter() - t0)  # fmt: skip

    def loss(self, trainer, model, inputs: dict, rows, num_items) -> tuple:
        split = "train" if model.training else "eval"
        row_list = rows.tolist()
        if split == "train":
            ro, old, ref, keep = self._train_rollout(trainer, model, inputs, row_list)
        else:
            prompts = [self.data.eval[i] for i in row_list]
            ro = self.rollout(model, prompts, row_list, -1 - trainer.state.global_step, inputs)
            old, ref, keep = None, self._reference(model, ro), None
        t0 = time.perf_counter()
        logps = completion_logps(model, ro, self.tok.pad_id, self.recipe.rl.temperature)
        if keep is not None:  # num_iterations > 1: the next steps reuse this generation
            keep(logps.detach())
        mask = (torch.arange(logps.shape[1])[None] <
                torch.tensor([len(c) for c in ro.completions])[:, None]).to(logps.device)  # fmt: skip
        if self.recipe.rl.mask_truncated_completions:
            mask = mask & ~ro.truncated[:, None].to(mask.device)
        accumulation = trainer.current_gradient_accumulation_steps if split == "train" else 1
        items = mask.sum() * accumulation  # dapo: a token mean over the step's micro-batches
        loss, stats = policy_loss(
            logps, old, ref, ro.advantages.to(logps.device), mask, self.settings,
            accumulation, items,
        )  # fmt: skip
        fresh = split == "eval" or old is None
        stats.update(self._rollout_stats(ro, time.perf_counter() - t0, fresh))
        self._stats[split].append(stats)
        if split == "train" and fresh:
            self._keep(trainer, ro)
        return loss, Output(loss=loss)

    def _train_rollout(self, trainer, model, inputs: dict, rows: list[int]):
        """(rollout, old log-probs, reference log-probs, keep): a fresh generation (old None:
        on-policy), or with num_iterations > 1 on a cycle's later steps the buffered one;
        `keep(old)` buffers a fresh one with its log-probs (None when mu is 1)."""
        step = trainer.state.global_step
        buffer = self.buffer
        first, micro, iteration = buffer.position(step) if buffer else (step, 0, 0)
        if iteration:
            g = buffer.reuse(micro, rows)
            return g.rollout, g.old, g.ref, None
        ro = self.rollout(model, [self.data.train[i] for i in rows], rows, first, inputs)
        ref = self._reference(model, ro)
        if buffer is None:
            return ro, None, ref, None
        return ro, None, ref, lambda old: buffer.keep(micro, Generated(rows, ro, old, ref))

    def _reference(self, model, ro: Rollout) -> Tensor | None:
        """The starting model's log-probs when beta > 0: the adapter switched off (LoRA,
        QLoRA), or the frozen copy `attach` made (full)."""
        if self.settings.beta == 0:
            return None
        temperature = self.recipe.rl.temperature
        with torch.no_grad():
            if self.reference is not None:
                return completion_logps(self.reference, ro, self.tok.pad_id, temperature)
            with model.disable_adapter():
                return completion_logps(model, ro, self.tok.pad_id, temperature)

    def _rollout_stats(self, ro: Rollout, train_seconds: float, fresh: bool) -> dict[str, Tensor]:
        total = ro.total
        lengths = torch.tensor([len(c) for c in ro.completions], dtype=torch.float32)
        stats = {
            "reward": torch.nanmean(total),
            "reward_std": nanstd(total),
            "frac_reward_zero_std": ro.zero_std.float().mean(),
            "completions/mean_length": lengths.mean(),
            "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": ro.truncated.float().mean(),
            "generation_seconds": torch.tensor(ro.seconds if fresh else 0.0),
            "training_seconds": torch.tensor(train_seconds),
        }
        for j, f in enumerate(self.rewards):
            stats[f"rewards/{f.name}/mean"] = torch.nanmean(ro.rewards[:, j])
            stats[f"rewards/{f.name}/std"] = nanstd(ro.rewards[:, j])
        return stats

    def _keep(self, trainer, ro: Rollout) -> None:
        """Every completion with its prompt and rewards, from every rank (in rank order),
        appended to completions.jsonl in the run by the main process (users read them); the
        console shows one per log."""
        group = len(ro.completions) // len(ro.prompts)
        rows = [
            {
                "step": trainer.state.global_step + 1,
                "origin": ro.prompts[i // group].origin,
                "completion": text,
                "rewards": [None if x != x else x for x in ro.rewards[i].tolist()],
                "advantage": round(float(ro.advantages[i]), 6),
            }
            for i, text in enumerate(ro.texts)
        ]
        rows = gather_to_main(rows)
        if not trainer.is_world_process_zero():
            return
        with (Path(trainer.args.output_dir) / "completions.jsonl").open("a") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        self._samples = [{"origin": rows[0]["origin"], "completion": rows[0]["completion"]}]

    def train_logs(self, steps: int) -> dict:
        stats, self._stats["train"] = self._stats["train"], []
        if self._samples:
            s = self._samples[-1]
            print(f"sample ({s['origin']}): {s['completion'][:200]!r}", file=sys.stderr)
            self._samples = []
        return mean_stats(stats, skip_nan=True, reduce=sum_across_ranks)

    def eval_logs(self, eval_loss: float) -> dict:
        stats, self._stats["eval"] = self._stats["eval"], []
        return mean_stats(stats, "eval_", skip_nan=True, reduce=sum_across_ranks)
