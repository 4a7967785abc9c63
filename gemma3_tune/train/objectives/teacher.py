"""The teacher of a distillation run, resolved and checked before any weights load: an HF
folder, a run directory (its adapter folded in), or gguf:NAME; same vocabulary and tokenizer as
the student, or a one-line refusal. Loaded only when needed, and freed before the student loads.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ...data.tokenizer import Tokenizer
from ...errors import UserError
from ...model.checkpoint import read_config
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
