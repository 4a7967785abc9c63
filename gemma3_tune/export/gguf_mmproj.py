"""The vision half of a Gemma 3 GGUF export: an "mmproj" file for llama.cpp's multimodal tools
(llama-mtmd-cli, llama-server, Ollama), written beside the text GGUF.

The layout is what llama.cpp's `convert_hf_to_gguf.py --mmproj` writes for Gemma 3
(`Gemma3VisionModel`): architecture `clip`, `general.type = mmproj`, projector type `gemma3`,
the `clip.vision.*` hyper-parameters, and tensor names from the gguf package's own
HF -> GGUF map for MMPROJ (`v.patch_embd`, `v.blk.N.attn_q`, `v.post_ln`,
`mm.input_projection`, `mm.soft_emb_norm`, ...). As there: the projector's RMSNorm weight is
stored as 1 + w (Gemma's zero-centred norm), SigLIP's LayerNorms as they are, the patch and
position embeddings in f32, and the input projection in f16 (f32 for an f32 export).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from ..model.checkpoint import ours_to_hf
from ..model.gemma3 import Gemma3
from .gguf_export import add_tensor, file_type

SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]  # Gemma3ImageProcessor's normalisation


def vision_tensors(model: Gemma3) -> dict[str, torch.Tensor]:
    """Tower and projector weights under transformers' published names
    (`vision_tower.vision_model.*`, `multi_modal_projector.mm_input_projection.weight`)."""
    out = {}
    for key, t in model.state_dict().items():
        name = ours_to_hf(key, "published")
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            out[name.replace("mm_input_projection_weight", "mm_input_projection.weight")] = t
    return out


@functools.cache
def _name_map(n_blocks: int):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, n_blocks)


def mmproj_name(hf_name: str, n_blocks: int) -> tuple[str, bool]:
    """(GGUF name, stored as 1 + w) for a published vision/projector tensor name."""
    g = _name_map(n_blocks).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if g is None:
        raise ValueError(f"no mmproj GGUF name for {hf_name}")
    return g, hf_name.endswith("soft_emb_norm.weight")


def write_mmproj(model: Gemma3, path: Path, dtype: str = "f16", name: str = "gemma3-tune") -> None:
    import gguf

    c = model.config
    v = c.vision
    assert v is not None
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(name)
    w.add_file_type(file_type(dtype))
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
    w.add_vision_projection_dim(c.hidden_size)
    w.add_vision_image_size(v.image_size)
    w.add_vision_patch_size(v.patch_size)
    w.add_vision_embedding_length(v.hidden_size)
    w.add_vision_feed_forward_length(v.intermediate_size)
    w.add_vision_block_count(v.num_hidden_layers)
    w.add_vision_head_count(v.num_attention_heads)
    w.add_vision_image_mean(SIGLIP_MEAN)
    w.add_vision_image_std(SIGLIP_STD)
    w.add_vision_attention_layernorm_eps(v.layer_norm_eps)
    w.add_vision_use_gelu(True)
    # Patches per side / soft tokens per side: 64 / 16 = 4 for the released models; llama.cpp
    # only reads the key when it differs from 4.
    scale = v.patches_per_side // math.isqrt(c.mm_tokens_per_image)
    if scale != 4:
        w.add_vision_projector_scale_factor(scale)

    for hf_name, t in vision_tensors(model).items():
        gname, plus_one = mmproj_name(hf_name, v.num_hidden_layers)
        t = t.detach().float() + (1.0 if plus_one else 0.0)
        add_tensor(w, gname, t, _tensor_type(gname, t, dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tensor_type(gname: str, t: torch.Tensor, dtype: str) -> str:
    if t.dim() == 1 or dtype == "f32" or gname.startswith(("v.patch_embd", "v.position_embd")):
        return "f32"
    if gname.startswith("mm.input_projection"):
        return "f16"
    return dtype
