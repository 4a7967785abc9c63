"""Distillation from a larger (or fine-tuned) Gemma 3: the report's method (section 2.2).

"We sample 256 logits per token, weighted by teacher probabilities. The student learns the
teacher's distribution within these samples via cross-entropy loss." Every scored token (the
positions the SFT loss scores: same labels, same mask) gets targets from the teacher:

- `mode: sampled` (default): `samples` independent draws from the teacher's softmax (at
  `temperature`), WITH replacement; each distinct id drawn gets weight count / samples, every
  other id 0. In expectation that is the teacher's full distribution, tail included, so the
  gradient of the student's cross-entropy to it is an unbiased estimate of the gradient of the
  cross-entropy to the whole teacher distribution (tests/test_distill_loss.py checks it over
  4,000 draws). Renormalising the teacher's own probabilities over the drawn ids (the other
  reading of "renormalized") would weight the head by more than its probability: biased.
- `mode: topk`: the `samples` most probable ids, their probabilities renormalised over them:
  what Axolotl, ms-swift and TRL cache today; biased towards the head (the tail is dropped),
  kept for comparison.
- `mode: full`: the teacher's whole softmax (the exact gradient; TRL's GKD loss does this on
  full logits). Only with the teacher in the step (`cache: false`): 262,144 probabilities per
  token are not stored; the loss makes them a chunk at a time from the teacher's hidden states.

The loss is model/loss.py's chunked_distillation: `alpha` x distillation cross-entropy
(times T^2) + (1 - alpha) x the labels' cross-entropy, over the full vocabulary, one chunk of
`[tokens, vocab]` at a time. With `cache: true` the teacher runs once, before the student is
loaded, and its targets are memory-mapped from data/teacher_cache.py; with `cache: false` it
runs in each step (a small teacher, or QAT's own unquantized weights).

The teacher shares Gemma 3's tokenizer and 262,144-token vocabulary; one with another vocabulary
or tokenizer is refused before anything loads. Samples that end on a user turn (prompt-only
data) are answered by the teacher first (data/answers.py), and the answers are cached too.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ...data.collate import every_position, row_features
from ...data.teacher_cache import TeacherCache, cache_key, fill
from ...data.tokenizer import Tokenizer
from ...errors import UserError
from ...model.loss import IGNORE_INDEX, SoftTargets, TeacherDistribution, teacher_targets
from ..distributed import wait_for_local_main
from ..recipe import Recipe
from .sft import SFT
from .teacher import LazyTeacher, TeacherSpec, check_compatible, resolve_teacher


def row_generator(seed: int, row: int, device) -> torch.Generator:
    """The draws of a row depend on the seed and the row only: a resumed fill, or another
    batch size, samples the same targets."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + row) % 2**63)


def scored(labels: torch.Tensor, shifted: bool = False) -> torch.Tensor:
    """Flat indices of the positions the loss scores: those whose next label is not -100
    (the model shifts labels the same way); `shifted`: labels already shifted on the whole
    row (a context-parallel shard's, train/context.py)."""
    targets = labels
    if not shifted:
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[..., :-1] = labels[..., 1:]
    return (targets.reshape(-1) != IGNORE_INDEX).nonzero()[:, 0]


@torch.no_grad()
def _teacher_hidden(teacher, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the teacher's final hidden states [B, T, D] on the batch, its head [V, D])."""
    weight = teacher.get_output_embeddings().weight  # [V, D]
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "pixel_values") if k in batch}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(weight.dtype)
    return teacher(**inputs, hidden_only=True).hidden, weight


@torch.no_grad()
def teacher_soft_targets(teacher, batch: dict, d, seed: int, rows: list[int]) -> tuple:
    """(ids, weights, token) for every scored token of a batch, from the teacher's forward.
    Each row draws from its own generator (row_generator), so the targets of a row are the
    same whether the teacher runs in the step or filled the cache."""
    h, weight = _teacher_hidden(teacher, batch)  # [B, T, D], [V, D]
    ids, weights, token, offset = [], [], [], 0
    for b, row in enumerate(rows):
        keep = scored(batch["labels"][b])  # [n_b]
        g = row_generator(seed, row, h.device)
        i, w, t = teacher_targets(
            h[b].index_select(0, keep), weight, d.samples, d.mode, d.temperature, g
        )
        ids.append(i)
        weights.append(w)
        token.append(t + offset)
        offset += keep.numel()
    return torch.cat(ids), torch.cat(weights), torch.cat(token)


@torch.no_grad()
def teacher_distribution(teacher, batch: dict, d, shifted: bool = False) -> TeacherDistribution:
    """`mode: full`: the teacher's hidden state at every scored token of the batch (in the
    order the loss scores them) and its head; the loss makes the softmax chunk by chunk.
    `shifted`: a context-parallel shard (`scored`), the teacher running on it as the student."""
    h, weight = _teacher_hidden(teacher, batch)  # [B, T, D], [V, D]
    keep = scored(batch["labels"], shifted).to(h.device)  # [K]
    hidden = h.reshape(-1, h.shape[-1]).index_select(0, keep)  # [K, D]
    return TeacherDistribution(hidden, weight, alpha=d.alpha, temperature=d.temperature)


class Distiller:
    """What the trainer needs in a step: the soft targets of a batch, from the cache (the
    collator put them in the batch) or from the teacher, run now."""

    def __init__(self, recipe: Recipe, cache: TeacherCache | None, teacher=None, settings=None):
        self.d = settings or recipe.distill  # DistillSection (QAT's self-teacher: its defaults)
        self.seed = recipe.training.seed
        self.cache = cache
        self.teacher = teacher

    def soft_targets(
        self, inputs: dict, rows: torch.Tensor, context=None
    ) -> SoftTargets | TeacherDistribution:
        """`rows`: the prepared row of each batch row (padding rows, which score nothing, past
        the end). `context`: the trainer's context-parallel group, whose shard `inputs` is (a
        cache's targets come sharded, train/context.py; a teacher model of its own runs on the
        shards as the student does; QAT's self-teacher is the student's model already)."""
        d = self.d
        if d.mode == "full":
            if context is not None and hasattr(self.teacher, "context"):
                self.teacher.context = context
            return teacher_distribution(self.teacher, inputs, d, shifted=context is not None)
        if "teacher_ids" in inputs:
            ids, weights = inputs.pop("teacher_ids"), inputs.pop("teacher_weights")
            token = inputs.pop("teacher_token")
        else:
            row_list = rows.tolist() + [-1] * (inputs["input_ids"].shape[0] - len(rows))
            ids, weights, token = teacher_soft_targets(self.teacher, inputs, d, self.seed, row_list)
        return SoftTargets(ids, weights, token, alpha=d.alpha, temperature=d.temperature)


def _cache_inputs(recipe: Recipe, spec: TeacherSpec, data, every: bool) -> dict:
    d = recipe.distill
    positions = {"positions": "every"} if every else {}  # labelled ones: the key as before
    return {
        **positions,
        "teacher": spec.fingerprint,
        "data": data.folder.name,  # the prepared data's own cache key
        "rows": data.digest(),
        "samples": d.samples,
        "mode": d.mode,
        "temperature": d.temperature,
        "seed": recipe.training.seed,
    }


def cache_folder(recipe: Recipe, spec: TeacherSpec, data, every: bool) -> tuple[Path, dict]:
    inputs = _cache_inputs(recipe, spec, data, every)
    return data.folder.parent / "teacher" / cache_key(inputs), inputs


def fill_cache(
    recipe: Recipe, spec: TeacherSpec, data, teacher_loader, collate, relabel=None
) -> TeacherCache:
    """The teacher's targets for every training row: from the cache, or computed now by the
    teacher (loaded only if needed), one row per forward, with a progress bar in tokens/s.
    `relabel(features) -> labels`: the positions to target, when not the row's labels."""
    folder, inputs = cache_folder(recipe, spec, data, relabel is not None)
    cache = TeacherCache(folder)
    if cache.complete:
        return cache
    rows = data.train_rows
    state: dict = {}

    def targets_for(indices: list[int]):
        from ...progress import bar as progress_bar

        if "teacher" not in state:
            state["teacher"] = teacher_loader()
            state["bar"] = progress_bar(len(rows), "teacher targets", "row")
            state["t0"], state["tokens"] = time.perf_counter(), 0
        teacher, bar = state["teacher"], state["bar"]
        device = next(teacher.parameters()).device
        for i in indices:
            features = row_features(rows[i])
            if relabel is not None:
                features["labels"] = relabel(features)
            batch = collate([features])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            seed = recipe.training.seed
            ids, weights, token = teacher_soft_targets(teacher, batch, recipe.distill, seed, [i])
            n = int(scored(batch["labels"]).numel())
            counts = torch.bincount(token, minlength=n)
            state["tokens"] += n
            bar.update(1)
            rate = state["tokens"] / max(time.perf_counter() - state["t0"], 1e-9)
            bar.set_postfix_str(f"{rate:,.0f} tokens/s")
            yield (
                ids.cpu().numpy().astype(np.int64),
                weights.cpu().numpy(),
                counts.cpu().numpy().astype(np.int64),
            )

    cache = fill(folder, len(rows), targets_for, inputs)
    if "bar" in state:
        state["bar"].close()
        seconds = time.perf_counter() - state["t0"]
        tokens = state["tokens"]
        print(
            f"teacher targets: {tokens} scored tokens in {seconds:.1f} s"
            f" ({tokens / max(seconds, 1e-9):,.0f} tokens/s),"
            f" {cache.nbytes() / max(cache.tokens(), 1):,.0f} bytes per token, in {folder}",
            file=sys.stderr,
        )
    return cache


def answers_folder(recipe: Recipe, spec: TeacherSpec, root: Path) -> Path:
    """Where the teacher's replies to prompt-only samples are kept: one store per teacher and
    generation settings (replies to any prompt are reused by every dataset)."""
    g = recipe.distill.generate
    key = cache_key(
        {
            "teacher": spec.fingerprint,
            "temperature": g.temperature,
            "max_new_tokens": g.max_new_tokens,
            "seed": recipe.training.seed if g.temperature > 0 else None,
        }
    )
    return root / "answers" / key


def prompts_and_store(recipe: Recipe, spec: TeacherSpec, tok: Tokenizer, cfg):
    """(prompt-only samples of the data, the teacher's answer store or None when there are
    none, how many of them it has not answered yet). Validates every sample on the way."""
    from ...data.answers import AnswerStore, find_prompts
    from ...data.dataset import vision_tokens
    from ...data.settings import data_root

    prompts = find_prompts(recipe.data, tok, vision_tokens(cfg), recipe.base_dir)
    if not prompts:
        return prompts, None, 0
    store = AnswerStore(answers_folder(recipe, spec, data_root(recipe.data, recipe.base_dir)))
    answered = store.load()
    return prompts, store, sum(p.key not in answered for p in prompts)


def setup(
    recipe: Recipe,
    tok: Tokenizer,
    cfg,
    dtype: torch.dtype,
    device: str,
    load_data,
    collate,
    relabel=None,
):
    """Prompt-only samples answered, data prepared (`load_data(answers, prompts)`), the
    teacher's targets cached (or the teacher kept for the steps): (data, Distiller).
    `relabel`: fill_cache's."""
    from ...data.answers import answer_prompts

    d = recipe.distill
    spec = resolve_teacher(recipe)
    check_compatible(spec, cfg, tok, d.samples)
    teacher = LazyTeacher(spec, dtype, device)
    prompts, store, missing = prompts_and_store(recipe, spec, tok, cfg)
    if missing and int(os.environ.get("LOCAL_RANK", "0")) != 0:
        answered = lambda: all(p.key in store.load() for p in prompts)  # noqa: E731
        wait_for_local_main(answered, "answer the prompts")
    elif missing:
        answer_prompts(
            teacher.get(),
            tok,
            prompts,
            store,
            max_new_tokens=d.generate.max_new_tokens,
            temperature=d.generate.temperature,
            seed=recipe.training.seed,
        )
    data = load_data(store, prompts if store is not None else None)
    if not d.cache:
        return data, Distiller(recipe, None, teacher.get())
    cache = fill_cache(recipe, spec, data, teacher.get, collate, relabel)
    teacher.free()
    return data, Distiller(recipe, cache)


class Distillation(SFT):
    """SFT with a teacher's distribution as the target: `distill:`, or QAT's `target: teacher`
    (the checkpoint the run starts from teaches its quantized copy). `distill:` targets the
    positions the labels score; QAT's teacher every position of the training rows (prompts,
    replies, raw text: `every_position`), so the quantized model keeps the checkpoint's whole
    distribution, not only its replies. Evaluation scores the labels, as SFT's."""

    name = "distill"
    log_prefixes = ("kd_loss", "ce_loss")

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        self.distiller: Distiller | None = None
        self._kd: list = []  # this process's (kd_loss, ce_loss) sums since the last log
        self.every = recipe.qat is not None and recipe.qat.target == "teacher"
        self.skip: frozenset[int] = frozenset()  # ids never targeted (set by prepare)
        self.context = None  # the trainer's context-parallel group (its logs sum over it)

    def relabel(self, features: dict) -> list[int]:
        """QAT's teacher: a training row's labels on every position (`every_position`)."""
        return every_position(features, self.skip)

    @staticmethod
    def refuse(recipe: Recipe) -> None:
        if recipe.distill is not None and recipe.data.feature_cache and not recipe.distill.cache:
            raise UserError(
                "distill.cache: false runs the teacher in each step on pixels, but"
                " data.feature_cache gives the batch cached features; set distill.cache=true"
                " or remove data.feature_cache"
            )

    def prepare(self):
        """Prompt-only samples answered by the teacher, the rows prepared and the teacher's
        targets cached, all before the student loads. QAT under LoRA has no teacher yet: the
        model itself will be (attach)."""
        from ...data.collate import Collator
        from ...model.dtypes import resolve_dtype
        from ..batches import pixel_loader
        from ..distributed import device
        from ..qat import teacher_recipe
        from ..run_data import load_data, tokenizer_and_config

        recipe = teacher_recipe(self.recipe) or self.recipe  # QAT full SFT: its checkpoint
        if recipe.distill is None:
            tok, cfg, data = super().prepare()
            self.skip = frozenset({tok.pad_id, cfg.image_token_id})
            return tok, cfg, data
        tok, cfg = tokenizer_and_config(recipe)
        self.skip = frozenset({tok.pad_id, cfg.image_token_id})
        load_image = pixel_loader(recipe, cfg)  # the teacher sees the pixels (its own tower)
        data, self.distiller = setup(
            recipe,
            tok,
            cfg,
            resolve_dtype(recipe.model.dtype),
            device(),
            lambda answers, prompts: load_data(recipe, answers=answers, prompts=prompts)[2],
            Collator(tok.pad_id, load_image),
            self.relabel if self.every else None,
        )
        return tok, cfg, data

    def attach(self, model) -> None:
        """QAT's `target: teacher` under LoRA: the model with its adapter and fake
        quantization off (qat.SelfTeacher) teaches, in each step."""
        if self.distiller is None:
            from ..qat import SelfTeacher
            from ..recipe import DistillSection

            mode = self.recipe.qat.distribution  # full | sampled: distill.mode's names
            settings = DistillSection(teacher="(the model itself)", mode=mode, cache=False)
            self.distiller = Distiller(self.recipe, None, SelfTeacher(model), settings)

    def row_fields(self, rows, split: str) -> dict:
        """Training rows: the cached targets, and under QAT's teacher the every-position
        labels (a field named labels replaces the row's)."""
        if split != "train":
            return {}
        fields = {}
        if self.every:
            fields["labels"] = lambda i: self.relabel(row_features(rows[i]))
        cache = self.distiller.cache if self.distiller is not None else None
        if cache is not None:
            fields["teacher"] = cache.targets
        return fields

    def loss(self, trainer, model, inputs: dict, rows, num_items) -> tuple:
        if not model.training:
            return super().loss(trainer, model, inputs, rows, num_items)
        self.context = trainer.context
        inputs["soft_targets"] = self.distiller.soft_targets(inputs, rows, trainer.context)
        loss, outputs = super().loss(trainer, model, inputs, rows, num_items)
        self._kd.append((outputs["kd_loss"].detach(), outputs["ce_loss"].detach()))
        return loss, outputs

    def train_logs(self, steps: int) -> dict:
        """kd_loss and ce_loss, per step, averaged since the last log (one host read)."""
        if not self._kd:
            return {}
        sums = torch.stack([torch.stack(p) for p in self._kd]).sum(0)  # [2]
        if self.context is not None:  # each shard's share of its rows' means: add them up
            import torch.distributed as dist

            dist.all_reduce(sums, group=self.context.group)
        kd, ce = sums.tolist()
        self._kd = []
        return {"kd_loss": kd / max(steps, 1), "ce_loss": ce / max(steps, 1)}
