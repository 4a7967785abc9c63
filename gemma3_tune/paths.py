"""Where gemma3-tune keeps what it makes once and reuses: the converted embedded model, prepared
data, teacher targets. A leaf: every package may import it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$GEMMA3_TUNE_CACHE, else ~/.cache/gemma3-tune."""
    return Path(os.environ.get("GEMMA3_TUNE_CACHE", Path.home() / ".cache" / "gemma3-tune"))
