"""transformers' Gemma 3 as the oracle: random reference models built from our configs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from gemma3_tune.model.config import Gemma3Config, config_to_hf


def hf_config(cfg: Gemma3Config):
    d = config_to_hf(cfg)
    d.pop("architectures")
    if cfg.is_multimodal:
        return transformers.Gemma3Config(**d)
    return transformers.Gemma3TextConfig(**d)


def hf_model(cfg: Gemma3Config, seed: int = 0) -> torch.nn.Module:
    """A transformers Gemma 3 with every weight random: norms and the projector included
    (transformers initialises norms and the projector to zero, which would hide bugs)."""
    torch.manual_seed(seed)
    hc = hf_config(cfg)
    hc._attn_implementation = "eager"
    cls = (
        transformers.Gemma3ForConditionalGeneration
        if cfg.is_multimodal
        else transformers.Gemma3ForCausalLM
    )
    model = cls(hc).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "layer_norm" in name:
                p.normal_(0.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
            elif "mm_input_projection" in name:
                p.normal_(0.0, p.shape[0] ** -0.5)
            else:
                p.normal_(0.0, 0.05)
    return model


def save_hf(model: torch.nn.Module, out: Path, *, layout: str = "hf", dialect: str = "v5") -> Path:
    """Save with transformers (layout "hf"), or rewrite its keys to the "published" or "memory"
    layout; dialect "published" rewrites config.json to the released checkpoints' field names."""
    model.save_pretrained(out)
    if layout != "hf":  # "published" or "memory": rename every key of the saved file
        from safetensors.torch import load_file, save_file

        from gemma3_tune.model.checkpoint import hf_to_ours, ours_to_hf

        mm = isinstance(model, transformers.Gemma3ForConditionalGeneration)
        f = out / "model.safetensors"
        sd = load_file(f)
        renamed = {
            ours_to_hf(hf_to_ours(k, mm), layout): v for k, v in sd.items() if "lm_head" not in k
        }
        save_file(renamed, f, metadata={"format": "pt"})
    if dialect == "published":
        cfg_file = out / "config.json"
        d = json.loads(cfg_file.read_text())
        text = d.get("text_config", d)
        rp = text.pop("rope_parameters")
        text.pop("layer_types")
        text["rope_theta"] = rp["full_attention"]["rope_theta"]
        text["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
        full = rp["full_attention"]
        text["rope_scaling"] = (
            {"rope_type": "linear", "factor": full["factor"]}
            if full.get("rope_type") == "linear"
            else None
        )
        text["sliding_window_pattern"] = 6
        cfg_file.write_text(json.dumps(d, indent=2))
    return out


def hf_image_pixels(img, size: int, pan_and_scan: bool) -> torch.Tensor:
    """transformers' Gemma 3 image processor (PIL backend) with our preprocessing settings:
    `[views, 3, size, size]`."""
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    proc = Gemma3ImageProcessorPil(
        size={"height": size, "width": size},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        do_pan_and_scan=pan_and_scan,
        pan_and_scan_min_crop_size=256,
        pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2,
    )
    return proc(images=img, return_tensors="pt")["pixel_values"]
