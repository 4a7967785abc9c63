"""gemma3-tune: fine-tune Gemma 3 with LoRA, QLoRA or full SFT."""

from .model import Gemma3, Gemma3Config, load_model, save_model

__all__ = ["Gemma3", "Gemma3Config", "load_model", "save_model"]
__version__ = "0.1.0"
