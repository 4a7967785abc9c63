"""gemma3-tune: fine-tune Gemma 3 with LoRA, QLoRA or full SFT."""

__all__ = ["Gemma3", "Gemma3Config", "load_model", "save_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`gemma3_tune.load_model` etc. import torch on first use, not on `import gemma3_tune`
    (which the CLI does before it knows whether a command needs torch)."""
    if name in __all__:
        from . import model

        return getattr(model, name)
    raise AttributeError(name)
