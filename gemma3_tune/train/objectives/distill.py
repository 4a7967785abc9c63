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

import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...data.collate import row_features
from ...data.teacher_cache import TeacherCache, cache_key, fill
from ...data.tokenizer import Tokenizer
from ...errors import UserError
from ...model.checkpoint import read_config
from ...model.loss import IGNORE_INDEX, SoftTargets, teacher_targets
from ..recipe import Recipe

# Tokenizers are compared on this text: special tokens, code, and several scripts.
_PROBE = (
    "<start_of_turn>user\nHello, wörld! 你好，世界。 Привет, мир. مرحبا 🌍 def f(x): return x**2"
    '<end_of_turn>\n<start_of_turn>model\n{"a": [1, 2.5e-3]}<end_of_turn>'
)


@dataclass
class TeacherSpec:
    """A teacher resolved without loading weights: where its files are, and their fingerprint."""

    text: str  # as the recipe names it
    base: Path  # HF folder (the base model for a run directory)
    adapter: Path | None  # a run's adapter, folded in on load
    run: Path | None  # the run directory, when the teacher is one
    fingerprint: dict


def resolve_teacher(recipe: Recipe) -> TeacherSpec:
    """The recipe's `distill.teacher` (an HF folder, a run directory, or gguf:NAME), refused in
    one line when it does not exist."""
    from ...data.prepare import source_fingerprint

    text = recipe.distill.teacher
    run = adapter = None
    if text.startswith("gguf:"):
        from ...convert.embedded import embedded_model_dir

        base = embedded_model_dir(text.removeprefix("gguf:"))
    else:
        p = Path(text).expanduser()
        p = p if p.is_absolute() else recipe.base_dir / p
        if (p / "config.json").is_file():
            base = p
        elif (p / "recipe.yaml").is_file():
            from ..runs import resolve_run

            run = p
            base, adapter = resolve_run(p)
        else:
            raise UserError(
                f"distill.teacher: {p} is neither a Gemma 3 HF folder (config.json), a run"
                " directory (recipe.yaml) nor gguf:gemma3-270m"
            )
    parts = {"base": source_fingerprint(base)}
    if adapter is not None:
        parts["adapter"] = source_fingerprint(adapter)
        if run is not None and (run / "qlora.json").is_file():
            parts["qlora"] = source_fingerprint(run / "qlora.json")
    return TeacherSpec(text, base, adapter, run, parts)


def check_compatible(spec: TeacherSpec, student_cfg, student_tok: Tokenizer, samples: int) -> None:
    """Same vocabulary, same tokenizer (ids of a probe text and the special tokens), and
    `samples` no larger than the vocabulary: each a one-line refusal naming the key."""
    t_cfg = read_config(spec.base)
    if t_cfg.vocab_size != student_cfg.vocab_size:
        raise UserError(
            f"distill.teacher: {spec.text} has a vocabulary of {t_cfg.vocab_size} tokens, the"
            f" student {student_cfg.vocab_size}; the teacher must be a Gemma 3 with the same"
            " tokenizer"
        )
    t_tok = Tokenizer(spec.base)
    same = t_tok.encode(_PROBE) == student_tok.encode(_PROBE) and t_tok.ids == student_tok.ids
    if not same:
        raise UserError(
            f"distill.teacher: {spec.text} tokenizes text differently from the student"
            " (another tokenizer); the teacher must share the student's tokenizer"
        )
    if samples > t_cfg.vocab_size:
        raise UserError(
            f"distill.samples: {samples} is more than the vocabulary ({t_cfg.vocab_size} tokens);"
            " use at most that (256 is the report's choice)"
        )


def load_teacher(spec: TeacherSpec, dtype: torch.dtype, device: str):
    """The teacher in eval mode, frozen, with a run's adapter folded in (QLoRA onto the very NF4
    base its run trained against)."""
    from ...model.checkpoint import load_model
    from ..runs import apply_adapter, run_method

    model = load_model(spec.base, dtype=torch.float32)
    if spec.run is not None and run_method(spec.run) == "qlora":
        from ..qlora import dequantize_like_run

        dequantize_like_run(model, spec.run)
    model = apply_adapter(model, spec.adapter)
    model = model.to(device, dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def row_generator(seed: int, row: int, device) -> torch.Generator:
    """The draws of a row depend on the seed and the row only: a resumed fill, or another
    batch size, samples the same targets."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + row) % 2**63)


def scored(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of the positions the loss scores: those whose next label is not -100
    (the model shifts labels the same way)."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[..., :-1] = labels[..., 1:]
    return (targets.reshape(-1) != IGNORE_INDEX).nonzero()[:, 0]


@torch.no_grad()
def teacher_soft_targets(teacher, batch: dict, d, seed: int, rows: list[int]) -> tuple:
    """(ids, weights, token) for every scored token of a batch, from the teacher's forward.
    Each row draws from its own generator (row_generator), so the targets of a row are the
    same whether the teacher runs in the step or filled the cache."""
    weight = teacher.get_output_embeddings().weight  # [V, D]
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "pixel_values") if k in batch}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(weight.dtype)
    h = teacher(**inputs, hidden_only=True).hidden  # [B, T, D]
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


class Distiller:
    """What the trainer needs in a step: the soft targets of a batch, from the cache (the
    collator put them in the batch) or from the teacher, run now."""

    def __init__(self, recipe: Recipe, cache: TeacherCache | None, teacher=None, settings=None):
        self.d = settings or recipe.distill  # DistillSection (QAT's self-teacher: its defaults)
        self.seed = recipe.training.seed
        self.cache = cache
        self.teacher = teacher

    def soft_targets(self, inputs: dict, rows: torch.Tensor) -> SoftTargets:
        """`rows`: the prepared row of each batch row (padding rows, which score nothing, past
        the end)."""
        d = self.d
        if "teacher_ids" in inputs:
            ids, weights = inputs.pop("teacher_ids"), inputs.pop("teacher_weights")
            token = inputs.pop("teacher_token")
        else:
            row_list = rows.tolist() + [-1] * (inputs["input_ids"].shape[0] - len(rows))
            ids, weights, token = teacher_soft_targets(self.teacher, inputs, d, self.seed, row_list)
        return SoftTargets(ids, weights, token, alpha=d.alpha, temperature=d.temperature)


def _cache_inputs(recipe: Recipe, spec: TeacherSpec, data) -> dict:
    d = recipe.distill
    return {
        "teacher": spec.fingerprint,
        "data": data.folder.name,  # the prepared data's own cache key
        "rows": data.digest(),
        "samples": d.samples,
        "mode": d.mode,
        "temperature": d.temperature,
        "seed": recipe.training.seed,
    }


def cache_folder(recipe: Recipe, spec: TeacherSpec, data) -> tuple[Path, dict]:
    inputs = _cache_inputs(recipe, spec, data)
    return data.folder.parent / "teacher" / cache_key(inputs), inputs


def fill_cache(recipe: Recipe, spec: TeacherSpec, data, teacher_loader, collate) -> TeacherCache:
    """The teacher's targets for every training row: from the cache, or computed now by the
    teacher (loaded only if needed), one row per forward, with a progress bar in tokens/s."""
    folder, inputs = cache_folder(recipe, spec, data)
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
            batch = collate([row_features(rows[i])])
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


class LazyTeacher:
    """Loads the teacher the first time it is needed (answers, cache fill, or the steps), and
    only then: a complete cache with answered prompts never loads it."""

    def __init__(self, spec: TeacherSpec, dtype: torch.dtype, device: str):
        self.spec, self.dtype, self.device = spec, dtype, device
        self.model = None

    def get(self):
        if self.model is None:
            print(f"loading teacher {self.spec.text}", file=sys.stderr)
            self.model = load_teacher(self.spec, self.dtype, self.device)
        return self.model

    def free(self) -> None:
        """Drop the teacher before the student loads: never both in memory."""
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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


def _wait_for_answers(store, prompts, seconds: float = 6 * 3600) -> None:
    deadline = time.monotonic() + seconds
    while any(p.key not in store.load() for p in prompts):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {seconds:.0f} s for local rank 0 to answer the prompts")
        time.sleep(2.0)


def setup(recipe: Recipe, tok: Tokenizer, cfg, dtype: torch.dtype, device: str, load_data, collate):
    """Prompt-only samples answered, data prepared (`load_data(answers, prompts)`), the
    teacher's targets cached (or the teacher kept for the steps): (data, Distiller)."""
    from ...data.answers import answer_prompts

    d = recipe.distill
    spec = resolve_teacher(recipe)
    check_compatible(spec, cfg, tok, d.samples)
    teacher = LazyTeacher(spec, dtype, device)
    prompts, store, missing = prompts_and_store(recipe, spec, tok, cfg)
    if missing and int(os.environ.get("LOCAL_RANK", "0")) != 0:
        _wait_for_answers(store, prompts)  # local rank 0 answers them
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
    cache = fill_cache(recipe, spec, data, teacher.get, collate)
    teacher.free()
    return data, Distiller(recipe, cache)
