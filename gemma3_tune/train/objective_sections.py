"""The recipe's sections for the objectives beyond SFT: `distill:`, `qat:`, `preference:`
and `rl:` (the schema only; recipe.py holds the whole recipe and loads it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..data.settings import Source
from ..model.formats import FORMATS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateSection(_Strict):
    temperature: float = Field(
        default=0.0, ge=0, description="the teacher's replies to prompt-only samples; 0: greedy"
    )
    max_new_tokens: int = Field(default=256, gt=0, description="longest teacher reply")


class DistillSection(_Strict):
    teacher: str = Field(
        description="HF folder, run directory, or gguf:gemma3-270m; same tokenizer as the student"
    )
    samples: int = Field(default=256, ge=1, description="teacher ids per token (the report: 256)")
    mode: Literal["sampled", "topk", "full"] = Field(
        default="sampled",
        description="sampled: draws with replacement, weight count/samples (unbiased);"
        " topk: the most probable ids, renormalised; full: the whole distribution (cache: false)",
    )
    temperature: float = Field(
        default=1.0, gt=0, description="softmax temperature of teacher and student (loss x T^2)"
    )
    alpha: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="weight of the distillation term; 1 - alpha: labels' CE",
    )
    cache: bool = Field(
        default=True,
        description="run the teacher once before training and read its targets from disk;"
        " false: run it in every step",
    )
    generate: GenerateSection = GenerateSection()

    @model_validator(mode="after")
    def _full_is_not_cached(self):
        if self.mode == "full" and self.cache:
            raise ValueError(
                "distill.mode: full needs the teacher in each step (262,144 probabilities per"
                " token are not cached); set distill.cache=false, or mode=sampled"
            )
        return self


class SelfTextSection(_Strict):
    samples: int = Field(default=256, gt=0, description="texts the checkpoint samples from <bos>")
    max_new_tokens: int = Field(default=512, gt=0, description="tokens per sampled text, at most")
    temperature: float = Field(
        default=1.0, gt=0, description="sampling temperature (1: the model's own distribution)"
    )


class QatSection(_Strict):
    format: Literal[FORMATS] = Field(
        description="fake-quantize every decoder linear exactly as this ggml GGUF format stores it"
    )
    embeddings: Literal["q8_0", "f16", "same"] = Field(
        default="q8_0", description="the tied embedding (LM head): q8_0, f16, or the format"
    )
    target: Literal["labels", "teacher"] = Field(
        default="teacher",
        description="teacher: distil the starting checkpoint, unquantized, on every position"
        " (the report's QAT; keeps the whole model); labels: cross-entropy on the labels",
    )
    distribution: Literal["full", "sampled"] = Field(
        default="full",
        description="target teacher: its whole softmax on every position (measured better),"
        " or the report's 256 sampled ids",
    )
    data: list[Source] | None = Field(
        default=None,
        description="what QAT trains on, mixable: train (data.train's sources), self (text the"
        " checkpoint samples from <bos>, qat.generate), or files; null: [train]",
    )
    generate: SelfTextSection = SelfTextSection()

    @field_validator("data", mode="before")
    @classmethod
    def _sources(cls, v):
        if isinstance(v, str | dict):
            v = [v]
        return v if v is None else [{"path": s} if isinstance(s, str) else s for s in v]

    @model_validator(mode="after")
    def _train_takes_no_weight(self):
        for s in self.data or []:
            if s.path == "train" and (s.weight or s.samples):
                raise ValueError(
                    "qat.data: `train` stands for data.train's sources as they are; set their"
                    " weights in data.train"
                )
        return self


class PreferenceSection(_Strict):
    beta: float = Field(
        default=0.1, gt=0, description="DPO/IPO: how far the policy may move from the reference"
    )
    loss: Literal["sigmoid", "ipo"] = Field(
        default="sigmoid", description="dpo's loss: sigmoid (DPO) or ipo (IPO, per-token means)"
    )
    label_smoothing: float = Field(
        default=0.0, ge=0, lt=0.5, description="sigmoid: the share of pairs assumed flipped"
    )
    reference: str = Field(
        default="base",
        description="dpo's reference model: base (the starting model; for LoRA, the adapter off)"
        " or an HF folder",
    )
    orpo_lambda: float = Field(
        default=0.1, gt=0, description="orpo: weight of the odds-ratio term beside the chosen NLL"
    )

    @model_validator(mode="after")
    def _smoothing_is_sigmoid(self):
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError("preference.label_smoothing applies to loss: sigmoid only")
        return self


class RLSection(_Strict):
    """objective: grpo. The keys are TRL's GRPOConfig names (and defaults), so its settings
    carry over; train/objectives/grpo.py says where ours differ."""

    rewards: list[str] = Field(
        default_factory=list,
        description="reward functions: path/to/file.py:name, module:name, or a built-in"
        " (json_valid, json_match:COL, json_equal:COL, exact:COL, contains:COL, regex:PATTERN,"
        " tool_call:COL,"
        " overlong:MAX:CACHE)",
    )
    reward_weights: list[float] | None = Field(
        default=None, description="one weight per reward function (default: all 1)"
    )
    num_generations: int = Field(default=8, ge=2, description="completions per prompt (G)")
    max_completion_length: int = Field(default=256, ge=1, description="tokens per completion")
    temperature: float = Field(default=1.0, gt=0, description="sampling temperature")
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling")
    top_k: int = Field(default=0, ge=0, description="sample from the k most likely (0: all)")
    beta: float = Field(
        default=0.0, ge=0, description="KL weight to the starting model (0: no reference)"
    )
    epsilon: float = Field(default=0.2, gt=0, lt=1, description="lower clip: 1 - epsilon")
    epsilon_high: float | None = Field(
        default=None, gt=0, description="upper clip: 1 + epsilon_high (DAPO; default epsilon)"
    )
    delta: float | None = Field(
        default=None, gt=1, description="cap on the importance weight (two-sided clipping)"
    )
    num_iterations: int = Field(
        default=1, ge=1, description="optimizer steps per generation batch (mu)"
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field(
        default="dapo", description="how per-token losses are averaged"
    )
    importance_sampling_level: Literal["token", "sequence"] = Field(
        default="token", description="sequence: GSPO's per-completion weight"
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        default="group", description="divide advantages by the group's std, the batch's, or not"
    )
    mask_truncated_completions: bool = Field(
        default=False, description="completions cut at max_completion_length get no loss"
    )

    @model_validator(mode="after")
    def _weights_match(self):
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(
                f"{len(self.reward_weights)} reward_weights for {len(self.rewards)} rewards"
            )
        return self
