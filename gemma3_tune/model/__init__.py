"""Our Gemma 3: config presets, decoder, SigLIP tower, masks, chunked loss, KV cache, HF I/O."""

from importlib import import_module

# Imported on first use (PEP 562), so that a light module of this package (formats.py, read by
# the recipe schema and the CLI's parser) does not pull in torch.
_WHERE = {
    "CheckpointError": "checkpoint",
    "load_model": "checkpoint",
    "save_model": "checkpoint",
    "PRESETS": "config",
    "Gemma3Config": "config",
    "VisionConfig": "config",
    "config_from_hf": "config",
    "config_to_hf": "config",
    "preset": "config",
    "Gemma3": "gemma3",
    "KVCache": "kv_cache",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)


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
