"""Export: merge, HF export, adapter export, GGUF import/export."""
