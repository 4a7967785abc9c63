"""Gemma 3 configuration: one small dataclass, a table of named presets, and HF config.json I/O.

The presets follow the published `config.json` files of google/gemma-3-{270m,1b,4b,12b,27b}.
config.json comes in two dialects, and both are read:
- published: `rope_theta`, `rope_local_base_freq`, `rope_scaling`, `sliding_window_pattern`;
- transformers 5: `rope_parameters` (per layer type) and `layer_types`.
We always write the transformers 5 dialect (plus the published keys, which it ignores).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

SLIDING = "sliding_attention"
GLOBAL = "full_attention"


@dataclass
class VisionConfig:
    """SigLIP vision tower (so400m/14 in the released 4B-27B checkpoints)."""

    hidden_size: int = 1152  # width of the SigLIP encoder
    intermediate_size: int = 4304  # SigLIP MLP width
    num_hidden_layers: int = 27  # encoder depth
    num_attention_heads: int = 16  # SigLIP heads (head_dim = hidden / heads)
    image_size: int = 896  # input resolution; images are resized to image_size x image_size
    patch_size: int = 14  # conv patch size: (896 / 14)^2 = 4096 patches
    num_channels: int = 3
    layer_norm_eps: float = 1e-6  # also the eps of the projector's soft-embedding RMSNorm

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class Gemma3Config:
    """The Gemma 3 text decoder, plus an optional vision tower (4B and up)."""

    vocab_size: int = 262144  # 262144 for 270M/1B, 262208 for the multimodal models
    hidden_size: int = 640  # model width
    intermediate_size: int = 2048  # GeGLU hidden width
    num_hidden_layers: int = 18
    num_attention_heads: int = 4
    num_key_value_heads: int = 1  # GQA: heads share K/V in groups of heads / kv_heads
    head_dim: int = 256
    query_pre_attn_scalar: int = 256  # attention scale is query_pre_attn_scalar ** -0.5
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512  # a key is visible when q - k < sliding_window
    layer_types: list[str] = field(default_factory=list)  # per layer: SLIDING or GLOBAL
    rope_local_base_freq: float = 10_000.0  # RoPE base on sliding layers
    rope_theta: float = 1_000_000.0  # RoPE base on global layers
    rope_scaling_factor: float = 1.0  # linear RoPE scaling on global layers only (8 for 4B+)
    max_position_embeddings: int = 32768
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    bos_token_id: int = 2
    # Vision (None for text-only checkpoints).
    vision: VisionConfig | None = None
    mm_tokens_per_image: int = 256  # soft tokens per image after 4x4 average pooling
    image_token_id: int = 262144  # the <image_soft_token> id, 256 of them per image
    boi_token_id: int = 255999  # <start_of_image>
    eoi_token_id: int = 256000  # <end_of_image>

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = default_layer_types(self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries, expected {self.num_hidden_layers}"
            )
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @property
    def model_type(self) -> str:
        """transformers' name for this architecture."""
        return "gemma3" if self.is_multimodal else "gemma3_text"

    def get_text_config(self, *args: Any, **kwargs: Any) -> Gemma3Config:
        """What HF's Trainer/TRL ask of a model config: the text part (here, the same object)."""
        return self

    def to_dict(self) -> dict:
        """The transformers config.json dict (what loggers such as wandb record)."""
        return config_to_hf(self)

    def to_json_string(self) -> str:
        """The same as JSON (HF's TensorBoard callback records it as text)."""
        import json

        return json.dumps(self.to_dict(), indent=2)

    def replace(self, **changes: Any) -> Gemma3Config:
        return dataclasses.replace(self, **changes)


def default_layer_types(n: int, pattern: int = 6) -> list[str]:
    """Five sliding layers then one global: layer i is global when (i + 1) % 6 == 0."""
    return [GLOBAL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]


_SIGLIP_SO400M = VisionConfig()
_MM = dict(vocab_size=262208, sliding_window=1024, rope_scaling_factor=8.0)
_MM_MAX_POS = 131072

PRESETS: dict[str, Gemma3Config] = {
    "270m": Gemma3Config(),
    "1b": Gemma3Config(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26),
    "4b": Gemma3Config(
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=_MM_MAX_POS,
        vision=_SIGLIP_SO400M,
        **_MM,
    ),  # fmt: skip
    "12b": Gemma3Config(
        hidden_size=3840,
        intermediate_size=15360,
        num_hidden_layers=48,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=_MM_MAX_POS,
        vision=_SIGLIP_SO400M,
        **_MM,
    ),  # fmt: skip
    "27b": Gemma3Config(
        hidden_size=5376,
        intermediate_size=21504,
        num_hidden_layers=62,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        query_pre_attn_scalar=168,
        max_position_embeddings=_MM_MAX_POS,
        vision=_SIGLIP_SO400M,
        **_MM,
    ),  # fmt: skip
    # Tiny presets for tests and benchmarks: seconds on a laptop CPU. Vocab and special-token
    # ids are filled in by `init-model` from the tokenizer it trains.
    "tiny": Gemma3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=16,
        max_position_embeddings=4096,
    ),  # fmt: skip
    "tiny-vision": Gemma3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=16,
        rope_scaling_factor=8.0,
        max_position_embeddings=4096,
        vision=VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
        ),
        mm_tokens_per_image=16,
    ),  # fmt: skip
}


def preset(name: str) -> Gemma3Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


# ---------------------------------------------------------------------------------------------
# config.json


def _rope_from_hf(text: dict) -> tuple[float, float, float]:
    """(global theta, local theta, global linear factor) from either dialect."""
    params = text.get("rope_parameters")
    if isinstance(params, dict) and GLOBAL in params:
        full, slide = params[GLOBAL] or {}, params.get(SLIDING) or {}
        factor = float(full.get("factor", 1.0)) if full.get("rope_type") == "linear" else 1.0
        if full.get("rope_type") not in (None, "default", "linear"):
            raise ValueError(f"unsupported rope_type {full.get('rope_type')!r} in config.json")
        return (
            float(full.get("rope_theta", 1e6)),
            float(slide.get("rope_theta", text.get("rope_local_base_freq", 1e4))),
            factor,
        )
    scaling = text.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in (None, "default", "linear"):
        raise ValueError(f"unsupported rope_scaling type {kind!r} in config.json")
    factor = float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0
    return (
        float(text.get("rope_theta", 1e6)),
        float(text.get("rope_local_base_freq", 1e4)),
        factor,
    )


def config_from_hf(d: dict) -> Gemma3Config:
    """Read a config.json dict: Gemma3ForConditionalGeneration (`text_config` + `vision_config`)
    or Gemma3ForCausalLM (flat `gemma3_text`)."""
    text = d.get("text_config", d) if "text_config" in d else d
    text = dict(text or {})
    n = int(text.get("num_hidden_layers", 26))
    if text.get("layer_types"):
        layer_types = list(text["layer_types"])
    else:
        layer_types = default_layer_types(n, int(text.get("sliding_window_pattern", 6)))
    theta, local, factor = _rope_from_hf(text)
    vision = None
    if d.get("vision_config") is not None:
        v = d["vision_config"]
        vision = VisionConfig(
            hidden_size=v.get("hidden_size", 1152),
            intermediate_size=v.get("intermediate_size", 4304),
            num_hidden_layers=v.get("num_hidden_layers", 27),
            num_attention_heads=v.get("num_attention_heads", 16),
            image_size=v.get("image_size", 896),
            patch_size=v.get("patch_size", 14),
            num_channels=v.get("num_channels", 3),
            layer_norm_eps=v.get("layer_norm_eps", 1e-6),
        )
    eos = d.get("eos_token_id", text.get("eos_token_id", 1))
    head_dim = int(text.get("head_dim", 256))
    return Gemma3Config(
        vocab_size=int(text.get("vocab_size", 262208)),
        hidden_size=int(text.get("hidden_size", 2304)),
        intermediate_size=int(text.get("intermediate_size", 9216)),
        num_hidden_layers=n,
        num_attention_heads=int(text.get("num_attention_heads", 8)),
        num_key_value_heads=int(text.get("num_key_value_heads", 4)),
        head_dim=head_dim,
        query_pre_attn_scalar=int(text.get("query_pre_attn_scalar") or head_dim),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        sliding_window=int(text.get("sliding_window") or 4096),
        layer_types=layer_types,
        rope_local_base_freq=local,
        rope_theta=theta,
        rope_scaling_factor=factor,
        max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
        pad_token_id=int(d.get("pad_token_id", text.get("pad_token_id", 0)) or 0),
        eos_token_id=eos if eos is not None else 1,
        bos_token_id=int(d.get("bos_token_id", text.get("bos_token_id", 2)) or 2),
        vision=vision,
        mm_tokens_per_image=int(d.get("mm_tokens_per_image", 256)),
        image_token_id=int(d.get("image_token_id", d.get("image_token_index", 262144))),
        boi_token_id=int(d.get("boi_token_id", d.get("boi_token_index", 255999))),
        eoi_token_id=int(d.get("eoi_token_id", d.get("eoi_token_index", 256000))),
    )


def _text_to_hf(c: Gemma3Config) -> dict:
    full = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling_factor != 1.0:
        full = {"rope_type": "linear", "factor": c.rope_scaling_factor, "rope_theta": c.rope_theta}
    return {
        "model_type": "gemma3_text",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "query_pre_attn_scalar": c.query_pre_attn_scalar,
        "rms_norm_eps": c.rms_norm_eps,
        "sliding_window": c.sliding_window,
        "layer_types": list(c.layer_types),
        "rope_parameters": {
            GLOBAL: full,
            SLIDING: {"rope_type": "default", "rope_theta": c.rope_local_base_freq},
        },
        "max_position_embeddings": c.max_position_embeddings,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "use_bidirectional_attention": False,
        "tie_word_embeddings": True,
        "pad_token_id": c.pad_token_id,
        "eos_token_id": c.eos_token_id,
        "bos_token_id": c.bos_token_id,
    }


def config_to_hf(c: Gemma3Config, dtype: str = "float32") -> dict:
    """A config.json that transformers 5 loads as Gemma3ForCausalLM or ...ForConditionalGeneration."""
    text = _text_to_hf(c)
    if not c.is_multimodal:
        return {
            "architectures": ["Gemma3ForCausalLM"],
            **text,
            "dtype": dtype,
            **transformers_version_field(),
        }
    v = c.vision
    assert v is not None
    return {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text,
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "num_channels": v.num_channels,
            "layer_norm_eps": v.layer_norm_eps,
            "hidden_act": "gelu_pytorch_tanh",
            "vision_use_head": False,
        },
        "mm_tokens_per_image": c.mm_tokens_per_image,
        "image_token_id": c.image_token_id,
        "boi_token_id": c.boi_token_id,
        "eoi_token_id": c.eoi_token_id,
        "image_token_index": c.image_token_id,
        "boi_token_index": c.boi_token_id,
        "eoi_token_index": c.eoi_token_id,
        "pad_token_id": c.pad_token_id,
        "eos_token_id": c.eos_token_id,
        "bos_token_id": c.bos_token_id,
        "tie_word_embeddings": True,
        "dtype": dtype,
        **transformers_version_field(),
    }


def transformers_version_field() -> dict:
    """`transformers_version`, as transformers writes it: without it, transformers (5.19 in
    vLLM, say) warns on every load that the tokenizer's regex pattern may be wrong."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return {"transformers_version": version("transformers")}
    except PackageNotFoundError:
        return {}


def pool_kernel(c: Gemma3Config) -> int:
    """Average-pool kernel that turns the patch grid into mm_tokens_per_image soft tokens."""
    assert c.vision is not None
    per_side = math.isqrt(c.mm_tokens_per_image)
    return c.vision.patches_per_side // per_side
