"""The recipe: one YAML file that says what to train, on what, and how.

Loaded with `yaml.safe_load`, overridden by `dotted.key=value` arguments (values parsed as YAML,
so `training.lr=1e-4` is a float and `data.packing=false` a bool), and validated by pydantic.
Every mistake is one line naming the key, and for an unknown key, the closest valid one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..data.settings import DataConfig
from ..errors import UserError
from .objective_sections import (
    DistillSection,
    PreferenceSection,
    QatSection,
    RLSection,
    _Strict,
)
from .schema_keys import explain, keys_of


class ModelSection(_Strict):
    path: str = Field(
        description="HF-format Gemma 3 folder, or gguf:gemma3-270m (the embedded model)"
    )
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(
        default="auto",
        description="compute and frozen weights (trained ones keep fp32 masters); auto: bfloat16"
        " on CUDA and on CPUs with AVX512-BF16 or AMX, else float32 (recipe.yaml records which)",
    )
    attn_backend: Literal["auto", "sdpa", "flex"] = Field(
        default="auto", description="flex on CUDA by default"
    )


class LoraSection(_Strict):
    r: int = Field(default=16, gt=0, description="LoRA rank")
    alpha: float = Field(
        default=32, gt=0, description="LoRA alpha (scale alpha / r, or / sqrt(r) with rsLoRA)"
    )
    dropout: float = Field(default=0.05, ge=0, lt=1, description="dropout on the LoRA path")
    targets: list[str] | str = Field(
        default="all-linear", description="'all-linear' (every decoder projection) or module names"
    )
    use_dora: bool = Field(
        default=False, description="DoRA: learn magnitude and direction separately"
    )
    use_rslora: bool = Field(default=False, description="rsLoRA: scale by alpha / sqrt(r)")


class TrainingSection(_Strict):
    output_dir: str = Field(
        default="runs/run", description="where checkpoints, adapter, metrics go"
    )
    max_steps: int = Field(default=-1, description="optimizer steps; -1 means use epochs")
    epochs: float = Field(
        default=1.0, gt=0, description="passes over the data (when max_steps is -1)"
    )
    micro_batch_size: int = Field(default=1, gt=0, description="rows per device per step")
    grad_accum: int = Field(default=1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(default=2e-4, gt=0, description="peak learning rate (AdamW)")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="decay after warmup, to 0 at the last step (constant: none)"
    )
    warmup_steps: int = Field(
        default=0, ge=0, description="linear warmup from lr / warmup_steps up to lr"
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(default=1.0, ge=0, description="gradient clipping (0: off)")
    save_steps: int = Field(default=500, gt=0, description="checkpoint-N/ every N steps")
    save_total_limit: int | None = Field(
        default=None, gt=0, description="keep the N newest complete checkpoints"
    )
    eval_steps: int | None = Field(
        default=None,
        gt=0,
        description="eval every N steps and at the last step (None: at the last step only)",
    )
    logging_steps: int = Field(
        default=10,
        gt=0,
        description="a metrics.jsonl row every N steps (TRL's default; each row reads the loss"
        " from the GPU, a sync)",
    )
    seed: int = Field(default=42, description="seeds data order, packing, LoRA init, dropout")
    gradient_checkpointing: bool = Field(
        default=False, description="recompute activations: less memory, ~30% slower"
    )
    context_parallel: int = Field(
        default=1,
        ge=1,
        description="ranks that share each packed row, one consecutive shard each (sliding layers"
        " exchange only their window's keys); divides the process count",
    )
    compile: bool | Literal["auto"] = Field(
        default="auto",
        description="torch.compile each decoder and SigLIP layer; auto: on with CUDA",
    )
    max_skipped_steps: int = Field(
        default=5, gt=0, description="non-finite steps in a row before the run stops"
    )
    resume: bool = Field(default=False, description="continue from the newest complete checkpoint")
    ddp_timeout: int = Field(
        default=1800,
        gt=0,
        description="seconds a rank waits for the others in a collective before the job fails",
    )
    force: bool = Field(default=False, description="allow writing into a non-empty output_dir")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default=[],
        description="trackers, as HF's report_to: tensorboard (output_dir/tensorboard), mlflow"
        " (if installed; MLFLOW_TRACKING_URI, else output_dir/mlruns), wandb (also on when"
        " wandb.project is set); metrics.jsonl is always written",
    )

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, v: int) -> int:
        """0 would train one step and print `step 1/0`; below -1 would quietly mean epochs."""
        from pydantic_core import PydanticCustomError

        if v == 0 or v < -1:
            raise PydanticCustomError(
                "max_steps",
                "set a positive number of optimizer steps, or -1 to train for training.epochs",
            )
        return v


class WandbSection(_Strict):
    project: str | None = Field(default=None, description="set to log to Weights & Biases")
    mode: Literal["online", "offline", "disabled"] = Field(
        default="offline", description="offline needs no network"
    )


class EvalSection(_Strict):
    metric: list[Literal["exact", "json", "contains", "loss", "preference", "reward"]] = Field(
        default=[],  # pydantic copies defaults: not shared between recipes
        description="after training, score the held-out chats (data.eval or data.eval_split)"
        " into eval.json and the model card, as `gemma3-tune eval` does; preference: the share"
        " of held-out pairs whose chosen reply is the more likely (objective dpo/orpo); reward:"
        " greedy completions of the data.eval prompts scored by rl.rewards (objective grpo)",
    )
    max_new_tokens: int | None = Field(
        default=None,
        gt=0,
        description="reply length for generation metrics; default: twice the longest reference"
        " reply in tokens, at least 32",
    )
    limit: int | None = Field(
        default=None, gt=0, description="score only the first N held-out chats"
    )

    @field_validator("metric", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


class Recipe(_Strict):
    model: ModelSection
    method: Literal["lora", "qlora", "full", "none"] = Field(
        default="lora", description="none: projector only"
    )
    lora: LoraSection = LoraSection()
    train_projector: bool = Field(default=False, description="train the multimodal projector fully")
    train_projector_lr: float | None = Field(
        default=None, gt=0, description="its own lr (default: training.lr)"
    )
    train_embeddings: bool | None = Field(
        default=None,
        description="train the tied embedding (also the LM head) at embedding_lr; null: the"
        " method's default (full: trained at training.lr; lora, qlora: frozen); false under full"
        " freezes it",
    )
    embedding_lr: float | None = Field(
        default=None, gt=0, description="its own lr (default: training.lr / 10)"
    )
    data: DataConfig
    training: TrainingSection = TrainingSection()
    deepspeed: str | None = Field(
        default=None, description="zero2 | zero3 | zero3_offload | path.json"
    )
    wandb: WandbSection = WandbSection()
    eval: EvalSection = EvalSection()
    distill: DistillSection | None = Field(
        default=None, description="learn a teacher's distribution (train/objectives/distill.py)"
    )
    qat: QatSection | None = Field(
        default=None, description="quantization-aware training for a GGUF export (train/qat.py)"
    )
    objective: Literal["sft", "dpo", "orpo", "grpo"] = Field(
        default="sft",
        description="sft: chats; dpo/orpo: preference pairs (train/objectives/preference.py);"
        " grpo: prompts and reward functions (train/objectives/grpo.py)",
    )
    preference: PreferenceSection = PreferenceSection()
    rl: RLSection = RLSection()

    base_dir: Path = Field(
        default=Path("."), exclude=True, description="relative data paths resolve here"
    )

    @model_validator(mode="after")
    def _has_training_data(self):
        """data.train may be empty only when qat.data names the data without `train`."""
        named = [s.path for s in self.qat.data] if self.qat and self.qat.data else ["train"]
        if "train" in named and not self.data.train:
            raise ValueError("data.train: name at least one file or folder to train on")
        return self


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"override {item!r}: expected dotted.key=value, e.g. training.lr=1e-4")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


DATA_SUFFIXES = (".jsonl", ".ndjson", ".parquet", ".arrow")


def _data_file(path: Path) -> UserError:
    return UserError(
        f"{path}: looks like a data file, not a recipe; name it under data.train in a recipe"
        " YAML (see recipes/quickstart.yaml) and pass the recipe"
    )


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such recipe file")
    if path.suffix in DATA_SUFFIXES:
        raise _data_file(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if text.lstrip().startswith(("{", "[")):  # JSON Lines do not parse as one YAML document
            raise _data_file(path) from None
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if raw is None:
        raw = {}
    samples = isinstance(raw, list) and raw and all(isinstance(x, dict) for x in raw)
    if samples or (isinstance(raw, dict) and {"messages", "conversations"} & set(raw)):
        raise _data_file(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of keys")
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.get(k, {}), dict):
                raise UserError(f"override {item!r}: {k} is not a section")
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        src = f"{path}" if not overrides else f"{path} (with overrides)"
        raise UserError(explain(Recipe, e, src)) from None
    recipe.base_dir = Path.cwd()  # data paths are relative to where you run, as in Axolotl
    return recipe


def model_dir(recipe: Recipe) -> Path:
    """The model folder a recipe names (`gguf:gemma3-270m` is the embedded real model)."""
    ref = recipe.model.path
    if ref.startswith("gguf:"):
        from ..convert.embedded import embedded_model_dir

        return embedded_model_dir(ref.removeprefix("gguf:"))
    p = Path(ref)
    p = p if p.is_absolute() else recipe.base_dir / p
    if not (p / "config.json").is_file():
        raise UserError(f"model.path: {p} is not a Gemma 3 HF folder (no config.json)")
    return p


def output_dir(recipe: Recipe) -> Path:
    """training.output_dir, resolved; refused when it holds files and the recipe neither
    resumes nor forces (checked before anything heavy is imported or loaded)."""
    out = Path(recipe.training.output_dir)
    out = out if out.is_absolute() else recipe.base_dir / out
    t = recipe.training
    if out.exists() and any(out.iterdir()) and not (t.resume or t.force):
        raise UserError(
            f"training.output_dir: {out} is not empty; set training.resume=true to continue it, "
            "training.force=true to write into it, or choose another output_dir"
        )
    return out


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def describe_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every recipe key, for `train --help` and
    docs/recipe-reference.md."""
    return keys_of(Recipe)
