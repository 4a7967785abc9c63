"""`gemma3-tune init-model`: a random-weight model in HF layout, with a working tokenizer."""

from __future__ import annotations

from pathlib import Path

from ..data.template import ensure_chat_template
from ..data.tokenizer import train_tiny_tokenizer, write_processor_files
from ..errors import UserError
from ..model.checkpoint import save_model
from ..model.config import preset
from ..model.gemma3 import Gemma3
from ..model.init import random_init
from ..outputs import refuse_existing, staged_dir


def init_model(name: str, out: str | Path, *, seed: int = 0, force: bool = False) -> Path:
    """Tiny presets get a freshly trained 512-piece tokenizer and its special-token ids; real
    sizes keep Gemma's ids (vocab 262144/262208) and the same small tokenizer (with byte
    fallback every text still encodes), which is enough for benchmarks."""
    out = Path(out)
    refuse_existing(out, force)
    try:
        cfg = preset(name)
    except ValueError as e:
        raise UserError(str(e)) from None
    with staged_dir(out, force) as tmp:
        ids = train_tiny_tokenizer(tmp, vocab_size=512, seed=seed)
        if name.startswith("tiny"):
            cfg = cfg.replace(
                vocab_size=512,
                image_token_id=ids["<image_soft_token>"],
                boi_token_id=ids["<start_of_image>"],
                eoi_token_id=ids["<end_of_image>"],
            )
        model = random_init(Gemma3(cfg), seed)
        save_model(model, tmp)
        ensure_chat_template(tmp)
        write_processor_files(tmp)  # vision presets: AutoProcessor opens the folder
    return out
