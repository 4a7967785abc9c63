"""The recipe keys people bring from other fine-tuning tools, and ours for each.

Someone who has used TRL (HF `TrainingArguments`), Axolotl, LLaMA-Factory, Unsloth or torchtune
writes `learning_rate`, `bf16` or `lora_r`. The closest spelling among our keys is the wrong
hint for most of them (`learning_rate` is closest to `logging_steps`), so the recipe loader
looks an unknown key up here first, wherever in the recipe it appears. Our own names in the
wrong section (`lr` at the top level) are found by the loader itself, not listed here.
"""

from __future__ import annotations

from typing import NamedTuple


class Hint(NamedTuple):
    key: str | None  # our dotted key; None where we have no equivalent
    value: str = ""  # the value to give it, where the foreign key was a flag (bf16: true)
    note: str = ""  # the choices, or (key None) what to do instead

    def text(self, given: str) -> str:
        """The part of the error after `unknown key ...; `."""
        if self.key is None:
            return f"gemma3-tune has no {given}: {self.note}"
        suggestion = f"{self.key}: {self.value}" if self.value else self.key
        return f"did you mean {suggestion}?" + (f" ({self.note})" if self.note else "")


_METHOD = "lora | qlora | full | none"
_TEMPLATE = "Gemma 3's own chat template is always used; remove it"
_EVAL = "eval runs every N steps and at the end"
_ADAMW = "training uses AdamW; set training.lr and training.weight_decay"
_SAVE = "embed_tokens and lm_head are one tied matrix; the projector: train_projector: true"

FOREIGN_KEYS: dict[str, Hint] = {
    # model
    "base_model": Hint("model.path"),  # Axolotl
    "model_name_or_path": Hint("model.path"),  # HF, LLaMA-Factory
    "model_name": Hint("model.path"),  # Unsloth
    "checkpointer": Hint("model.path", note="an HF-format Gemma 3 folder"),  # torchtune
    "torch_dtype": Hint("model.dtype", note="auto | bfloat16 | float32 | float16"),
    "bf16": Hint("model.dtype", "bfloat16"),
    "fp16": Hint("model.dtype", "float16"),
    "tf32": Hint(None, note="TF32 is PyTorch's matmul setting; set model.dtype for precision"),
    "attn_implementation": Hint("model.attn_backend", note="auto | sdpa | flex"),
    "flash_attention": Hint("model.attn_backend", "flex"),  # Axolotl
    "sdp_attention": Hint("model.attn_backend", "sdpa"),  # Axolotl
    "tokenizer": Hint(None, note="the tokenizer is read from the model.path folder"),
    # method
    "adapter": Hint("method", note=_METHOD),  # Axolotl
    "finetuning_type": Hint("method", note=_METHOD),  # LLaMA-Factory
    "load_in_4bit": Hint("method", "qlora"),  # Axolotl, Unsloth
    "quantization_bit": Hint("method", "qlora", note="4-bit NF4"),  # LLaMA-Factory
    "load_in_8bit": Hint(None, note="use method: qlora (4-bit) or method: lora"),
    "stage": Hint(None, note="`gemma3-tune train` is supervised fine-tuning; remove it"),
    "finetune_vision_layers": Hint(
        None, note="the SigLIP tower stays frozen; train_projector: true trains the projector"
    ),
    # lora
    "lora_r": Hint("lora.r"),
    "lora_rank": Hint("lora.r"),  # LLaMA-Factory, torchtune
    "rank": Hint("lora.r"),
    "lora_alpha": Hint("lora.alpha"),
    "lora_dropout": Hint("lora.dropout"),
    "lora_target_modules": Hint("lora.targets"),  # Axolotl
    "target_modules": Hint("lora.targets"),  # peft, Unsloth
    "lora_target": Hint("lora.targets", note="all-linear, or module names"),  # LLaMA-Factory
    "lora_attn_modules": Hint("lora.targets"),  # torchtune
    "lora_target_linear": Hint("lora.targets", "all-linear"),  # Axolotl
    "finetune_language_layers": Hint("lora.targets", "all-linear"),  # Unsloth
    "peft_use_dora": Hint("lora.use_dora"),  # Axolotl
    "peft_use_rslora": Hint("lora.use_rslora"),  # Axolotl
    "modules_to_save": Hint("train_embeddings", "true", note=_SAVE),  # peft, Unsloth
    "lora_modules_to_save": Hint("train_embeddings", "true", note=_SAVE),  # Axolotl
    "additional_target": Hint("train_embeddings", "true", note=_SAVE),  # LLaMA-Factory
    "embedding_learning_rate": Hint("embedding_lr", note="with train_embeddings: true"),  # Unsloth
    "embedding_lr_scale": Hint(
        "embedding_lr", note="an lr, not a factor: training.lr times the scale"
    ),  # Axolotl
    # data
    "datasets": Hint("data.train", note="paths, or {path, weight | samples}"),  # Axolotl
    "dataset": Hint("data.train", note="paths, or {path, weight | samples}"),  # LLaMA-Factory
    "test_datasets": Hint("data.eval"),  # Axolotl
    "eval_dataset": Hint("data.eval"),  # LLaMA-Factory
    "val_set_size": Hint("data.eval_split", note="a fraction of data.train, e.g. 0.05"),
    "val_size": Hint("data.eval_split", note="a fraction of data.train, e.g. 0.05"),
    "sequence_len": Hint("data.max_seq_len"),  # Axolotl
    "max_seq_length": Hint("data.max_seq_len"),  # TRL < 0.20, Unsloth
    "max_length": Hint("data.max_seq_len"),  # TRL
    "cutoff_len": Hint("data.max_seq_len"),  # LLaMA-Factory
    "sample_packing": Hint("data.packing"),  # Axolotl
    "neat_packing": Hint("data.packing"),  # LLaMA-Factory
    "train_on_inputs": Hint("data.train_on", note="assistant | last | all"),  # Axolotl
    "train_on_prompt": Hint("data.train_on", note="assistant | last | all"),  # LLaMA-Factory
    "assistant_only_loss": Hint("data.train_on", "assistant"),  # TRL
    "completion_only_loss": Hint("data.train_on", note="assistant | last | all"),  # TRL
    "mask_history": Hint("data.train_on", "last"),  # LLaMA-Factory
    "dataset_prepared_path": Hint("data.cache_dir"),  # Axolotl
    "dataset_num_proc": Hint("data.num_proc"),  # TRL
    "dataset_processes": Hint("data.num_proc"),  # Axolotl
    "preprocessing_num_workers": Hint("data.num_proc"),  # LLaMA-Factory
    "media_dir": Hint("data.image_root"),  # LLaMA-Factory
    "image_dir": Hint("data.image_root"),
    "image_folder": Hint("data.image_root"),
    "dataset_text_field": Hint(None, note="data are chats (messages or conversations)"),
    "chat_template": Hint(None, note=_TEMPLATE),
    "template": Hint(None, note=_TEMPLATE),  # LLaMA-Factory
    # training
    "learning_rate": Hint("training.lr"),
    "lr_scheduler_type": Hint("training.lr_scheduler", note="cosine | linear | constant"),
    "warmup_ratio": Hint(None, note="set training.warmup_steps (the ratio times the steps)"),
    "gradient_accumulation_steps": Hint("training.grad_accum"),
    "per_device_train_batch_size": Hint("training.micro_batch_size"),
    "per_device_eval_batch_size": Hint("training.micro_batch_size", note="eval uses it too"),
    "batch_size": Hint("training.micro_batch_size"),  # torchtune
    "num_train_epochs": Hint("training.epochs"),
    "num_epochs": Hint("training.epochs"),  # Axolotl
    "max_steps_per_epoch": Hint("training.max_steps"),  # torchtune
    "optim": Hint(None, note=_ADAMW),
    "optimizer": Hint(None, note=_ADAMW),
    "use_gradient_checkpointing": Hint("training.gradient_checkpointing"),  # Unsloth
    "enable_activation_checkpointing": Hint("training.gradient_checkpointing"),  # torchtune
    "torch_compile": Hint("training.compile"),
    "random_state": Hint("training.seed"),  # Unsloth
    "log_every_n_steps": Hint("training.logging_steps"),  # torchtune
    "eval_strategy": Hint("training.eval_steps", note=_EVAL),
    "evaluation_strategy": Hint("training.eval_steps", note=_EVAL),
    "save_strategy": Hint("training.save_steps"),
    "resume_from_checkpoint": Hint("training.resume", "true"),
    "auto_resume_from_checkpoints": Hint("training.resume", "true"),  # Axolotl
    "overwrite_output_dir": Hint("training.force", "true"),
    # logging, distribution, publishing
    "wandb_project": Hint("wandb.project"),  # Axolotl
    "wandb_mode": Hint("wandb.mode"),  # Axolotl
    "metric_logger": Hint("training.report_to", note="tensorboard | mlflow | wandb"),
    "push_to_hub": Hint(None, note="run `gemma3-tune export`, then upload the folder"),
    "hub_model_id": Hint(None, note="run `gemma3-tune export`, then upload the folder"),
}
