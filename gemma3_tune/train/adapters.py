"""What trains: LoRA / DoRA / rsLoRA (peft), QLoRA (bitsandbytes NF4 + peft), full SFT, and
the multimodal projector (the "vision adapter"). The SigLIP tower never trains.

LoRA targets are anchored to the text decoder (`model.[language_model.]layers.N.*`): a bare
`q_proj` would also match SigLIP's attention. A trained projector is a peft `modules_to_save`
entry, so the saved adapter carries it and loads onto transformers' Gemma 3 too. With
`method: none`, only the projector trains and is saved on its own (peft needs a LoRA target).

A trained embedding (`train_embeddings`) is a `modules_to_save` entry too. It is tied: our LM head
reads `embed_tokens.weight`, which peft's wrapper resolves to its trained copy, so input and head
stay one tensor. transformers' Gemma 3 has a separate `lm_head` tied to the embedding: the
adapter's config asks peft to tie it to the copy (`ensure_weight_tying`, portable_config).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..model.gemma3 import Gemma3
from .qlora import DECODER_LAYER, quantize_decoder
from .recipe import Recipe

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SUBMODULE = {
    n: ("self_attn" if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp")
    for n in DECODER_LINEARS
}
PROJECTOR = "multi_modal_projector"
EMBEDDING = "embed_tokens"  # the tied input embedding and LM head


def trains_embeddings(recipe: Recipe) -> bool:
    """`train_embeddings`, or the method's default: full trains it, the adapters do not."""
    te = recipe.train_embeddings
    return te if te is not None else recipe.method == "full"


def group_lrs(recipe: Recipe) -> dict[str, float]:
    """Name fragment -> lr, for the parameters that train at their own rate (the rest at
    training.lr): the projector at train_projector_lr, a trained embedding at embedding_lr
    (default lr / 10) when asked for (`train_embeddings: true`; full's default keeps lr)."""
    lrs = {}
    if recipe.train_projector_lr is not None:
        lrs[PROJECTOR] = recipe.train_projector_lr
    if recipe.train_embeddings:
        lrs[EMBEDDING] = recipe.embedding_lr or recipe.training.lr / 10
    return lrs


def target_regex(targets: list[str] | str) -> str:
    """A peft `target_modules` regex (matched against full module names) for decoder linears."""
    names = list(DECODER_LINEARS) if targets in ("all-linear", ["all-linear"]) else targets
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in DECODER_LINEARS]
    if unknown and unknown[0] in (EMBEDDING, "lm_head"):
        raise UserError(
            f"lora.targets: {unknown[0]} is the tied embedding;"
            " train it with train_embeddings: true"
        )
    if unknown:
        raise UserError(
            f"lora.targets: unknown module {unknown[0]!r}; choose from {', '.join(DECODER_LINEARS)} or all-linear"
        )
    alts = "|".join(f"{_SUBMODULE[n]}\\.{n}" for n in names)
    return rf"{DECODER_LAYER}\.(?:{alts})"


def apply_method(model: Gemma3, recipe: Recipe) -> nn.Module:
    """Freeze what does not train and wrap with peft where needed. Returns the model to train."""
    method = recipe.method
    if recipe.train_projector and not model.config.is_multimodal:
        raise UserError("train_projector: the model is text-only (no projector); use a 4B+ Gemma 3")
    if method == "none" and not recipe.train_projector:
        raise UserError("method: none trains nothing unless train_projector: true")
    model.requires_grad_(False)
    if method == "full":
        model.text_model.requires_grad_(True)
        model.text_model.embed_tokens.requires_grad_(trains_embeddings(recipe))
    if method in ("lora", "qlora"):
        import peft

        if method == "qlora" and not getattr(model, "is_loaded_in_4bit", False):
            quantize_decoder(model, next(model.parameters()).dtype)  # qlora.load_quantized did not
        cfg = peft.LoraConfig(
            r=recipe.lora.r,
            lora_alpha=recipe.lora.alpha,
            lora_dropout=recipe.lora.dropout,
            target_modules=target_regex(recipe.lora.targets),
            use_dora=recipe.lora.use_dora,
            use_rslora=recipe.lora.use_rslora,
            modules_to_save=_modules_to_save(recipe),
            bias="none",
        )
        model = peft.get_peft_model(model, cfg)
    elif recipe.train_projector:
        proj = model.projector
        assert proj is not None
        proj.requires_grad_(True)
    # The tower is frozen whatever the method (peft must not have touched it).
    base = unwrap(model)
    if base.vision_tower is not None:
        base.vision_tower.requires_grad_(False)
    return model


def _modules_to_save(recipe: Recipe) -> list[str] | None:
    names = [PROJECTOR] * recipe.train_projector + [EMBEDDING] * trains_embeddings(recipe)
    return names or None


def unwrap(model: nn.Module) -> Gemma3:
    """The Gemma3 under a peft wrapper (or the model itself)."""
    while not isinstance(model, Gemma3):
        model = model.get_base_model() if hasattr(model, "get_base_model") else model.module
    return model


def _block(name: str) -> str:
    if "vision_tower" in name:
        return "vision tower (frozen)"
    if PROJECTOR in name:
        return "projector"
    if "embed_tokens" in name:
        return "embeddings (tied LM head)"
    if re.search(r"layers\.\d+\.", name):
        return "decoder layers: LoRA" if "lora_" in name else "decoder layers"
    return "final norm"


def parameter_table(model: nn.Module) -> str:
    """Trainable vs frozen parameters by block, for the start of a run. Each parameter counts
    once: peft's `modules_to_save` (the trained projector) keeps the original module beside
    its trainable copy, and only the copy is the model's (the total is the model's own
    parameters plus the LoRA ones)."""
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, p in model.named_parameters():
        if ".original_module." in name:  # peft's frozen stand-by for a modules_to_save copy
            continue
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # packed 4-bit: two values per byte
        rows[_block(name)][0 if p.requires_grad else 1] += n
    lines = [f"{'block':<28}{'trainable':>14}{'frozen':>16}"]
    for block, (t, f) in rows.items():
        lines.append(f"{block:<28}{t:>14,}{f:>16,}")
    total_t = sum(r[0] for r in rows.values())
    total = sum(r[0] + r[1] for r in rows.values())
    lines.append(
        f"{'total':<28}{total_t:>14,}{total - total_t:>16,}  ({100 * total_t / max(total, 1):.2f}% trainable)"
    )
    return "\n".join(lines)


# peft's `auto_mapping` names the class AutoPeftModel builds the base with. For our model it
# would be gemma3_tune's (refused: not in peft's import allowlist, and not what others load);
# the transformers class of the base folder is what peft writes for a transformers model.
HF_CLASS = {"gemma3": "Gemma3ForConditionalGeneration", "gemma3_text": "Gemma3ForCausalLM"}


def portable_config(cfg: dict, base: Path) -> dict:
    """An adapter_config.json that `peft.AutoPeftModelForCausalLM.from_pretrained(adapter)`
    loads onto transformers' Gemma 3 in `base` (an HF folder): its absolute path, and the
    transformers class. task_type stays null: with CAUSAL_LM, peft would wrap our own model
    in PeftModelForCausalLM too, which needs transformers' generation methods. A trained
    embedding asks peft to tie transformers' `lm_head` to its trained copy (else that head
    would keep reading the base's embedding)."""
    model_type = json.loads((base / "config.json").read_text()).get("model_type")
    auto = {
        "base_model_class": HF_CLASS.get(model_type, "Gemma3ForCausalLM"),
        "parent_library": "transformers.models.gemma3.modeling_gemma3",
    }
    tied = EMBEDDING in (cfg.get("modules_to_save") or [])
    return {
        **cfg,
        "base_model_name_or_path": str(base.resolve()),
        "auto_mapping": auto,
        **({"ensure_weight_tying": True} if tied else {}),
    }


# Where peft reads transformers' Gemma 3 lm_head from when ensure_weight_tying ties it to a
# trained embedding (both classes keep lm_head at the top).
HF_HEAD = "base_model.model.lm_head.weight"


def portable_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter weights that load onto transformers' Gemma 3 too: with a trained embedding, peft
    ties that model's separate lm_head to it and loads the head from its own key (as peft saves
    it for transformers' models: the matrix twice). Our model has no lm_head and ignores it."""
    emb = [k for k in weights if k.endswith(f"{EMBEDDING}.weight")]
    if not emb or HF_HEAD in weights:
        return weights
    return {**weights, HF_HEAD: weights[emb[0]].clone()}


def write_portable_weights(adapter: Path) -> None:
    """Rewrite `adapter/adapter_model.safetensors` (as peft saved it) with portable_weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    if not path.is_file():
        return
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if HF_HEAD in keys or not any(k.endswith(f"{EMBEDDING}.weight") for k in keys):
        return
    tmp = path.with_name(path.name + ".partial")
    save_file(portable_weights(load_file(str(path))), str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def write_portable_config(adapter: Path, base: Path) -> None:
    """Rewrite `adapter/adapter_config.json` (as peft saved it) with portable_config."""
    path = adapter / "adapter_config.json"
    cfg = portable_config(json.loads(path.read_text()), base)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
