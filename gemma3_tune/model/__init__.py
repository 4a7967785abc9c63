"""Our Gemma 3: config presets, decoder, SigLIP tower, masks, chunked loss, KV cache, HF I/O."""

from .checkpoint import CheckpointError, load_model, save_model
from .config import PRESETS, Gemma3Config, VisionConfig, config_from_hf, config_to_hf, preset
from .gemma3 import Gemma3, KVCache

__all__ = [
    "PRESETS",
    "CheckpointError",
    "Gemma3",
    "Gemma3Config",
    "KVCache",
    "VisionConfig",
    "config_from_hf",
    "config_to_hf",
    "load_model",
    "preset",
    "save_model",
]
