"""Saving a run's trained weights: adapter/ (peft) or model/ (full SFT), complete or absent,
and what every folder of trained weights carries besides them."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from ..data.template import ensure_chat_template
from ..data.tokenizer import copy_tokenizer_files
from ..model.checkpoint import save_model
from ..outputs import replace_dir, write_atomic
from . import precision
from .adapters import PROJECTOR, unwrap, write_portable_config, write_portable_weights
from .checkpoints import UNREAD
from .recipe import Recipe


def folder_files(dest: Path, base: Path) -> None:
    """What every folder of trained weights carries besides them (adapter/, model/ and each
    checkpoint-N/): the base's tokenizer files and the chat template, and for a peft adapter
    an adapter_config.json (and weights) that peft's AutoPeftModel loads onto transformers'
    Gemma 3."""
    copy_tokenizer_files(base, dest)
    ensure_chat_template(dest)
    if (dest / "adapter_config.json").is_file():
        write_portable_config(dest, base)
        write_portable_weights(dest)


def save_final(trainer, recipe: Recipe, out: Path, base_folder: Path) -> None:
    """adapter/ (peft) or model/ (full SFT), written under a temporary name and renamed when
    complete, and the final model card in it and in the run. Every rank takes part: under
    ZeRO-3 the weights are gathered from all of them; rank 0 writes."""
    name = "model" if recipe.method == "full" else "adapter"
    dest, tmp = out / name, out / f".{name}.partial"
    main = trainer.is_world_process_zero()
    if main and tmp.exists():
        shutil.rmtree(tmp)
    masters = precision.trainable_fp32_state(trainer)  # every rank: gathered under ZeRO-3
    if recipe.method in ("lora", "qlora"):
        if main:  # peft: adapter_config.json + adapter_model.safetensors, fp32
            trainer.model.save_pretrained(str(tmp), state_dict=masters)
    else:
        engine = trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model
        state = trainer.accelerator.get_state_dict(engine)  # gathered under ZeRO-3
        if main:
            state = {k.removeprefix("module."): v for k, v in state.items()}
            state.update(masters)  # DeepSpeed's module holds bf16 copies of them
            if recipe.method == "full":  # the fp32 masters, and the rest in fp32 alongside
                save_model(unwrap(trainer.model), tmp, state_dict=state, dtype=torch.float32)
            else:  # projector only
                from safetensors.torch import save_file

                tmp.mkdir(parents=True, exist_ok=True)
                proj = {
                    k: v.detach().cpu().contiguous() for k, v in state.items() if PROJECTOR in k
                }
                save_file(proj, str(tmp / "projector.safetensors"), metadata={"format": "pt"})
    if not main:
        return
    (tmp / UNREAD).unlink(missing_ok=True)  # HF's pickled TrainingArguments (docs/training.md)
    card = trainer.card_text(done=True)
    write_atomic(tmp / "README.md", card)  # replaces peft's template
    folder_files(tmp, base_folder)
    replace_dir(tmp, dest)
    write_atomic(out / "README.md", card)  # the run's card, final
    print(f"saved {dest}", file=sys.stderr)
