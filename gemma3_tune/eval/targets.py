"""What `gemma3-tune eval` can score, and how each is loaded (one at a time, when its turn
comes): a run directory (its adapter merged onto its base, QLoRA onto the very NF4 base it
trained against, or its `model/` for full SFT), an HF folder (with `--adapter`), the embedded
`gguf:gemma3-270m`, or a `.gguf` file, de-quantized into our model: exactly the stored weights,
so the score isolates what quantization did."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:  # torch loads only when a model does: a bad target answers in a second
    import torch


@dataclass
class Target:
    label: str  # as the user wrote it: the row of the table, the key of the JSON scores
    kind: str  # "run", "folder", "embedded", "gguf"
    path: Path
    adapter: Path | None = None


def parse_target(text: str, adapter: Path | None = None) -> Target:
    """Refuse a target that does not exist before any model loads (one line)."""
    if text.startswith("gguf:"):
        return Target(text, "embedded", Path(text.removeprefix("gguf:")), adapter)
    path = Path(text)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"eval: {text}: no such GGUF file")
        if adapter is not None:
            raise UserError(f"eval: --adapter applies to HF folders, not to the GGUF {text}")
        return Target(text, "gguf", path)
    if (path / "recipe.yaml").is_file():
        if adapter is not None:
            raise UserError(f"eval: {text} is a run directory: it brings its own adapter")
        return Target(text, "run", path)
    if (path / "config.json").is_file():
        if adapter is not None and not adapter.is_dir():
            raise UserError(f"eval: --adapter {adapter}: no such folder")
        return Target(text, "folder", path, adapter)
    raise UserError(
        f"eval: {text}: not found; give a run directory, an HF model folder, gguf:gemma3-270m"
        " or a .gguf file"
    )


def target_config(target: Target):
    """The target's model config, read without loading weights: bad targets (another
    architecture, a GGUF that is not one) are refused before any model loads."""
    from ..model.checkpoint import read_config

    if target.kind == "gguf":
        from gguf import GGUFReader

        from ..convert.gguf_import import config_from_gguf

        try:
            reader = GGUFReader(str(target.path))
        except Exception as e:  # the gguf package raises bare ValueErrors on bad files
            raise UserError(f"eval: {target.path}: not a readable GGUF file ({e})") from None
        return config_from_gguf(reader, target.path)
    if target.kind == "run":
        from ..export.inference import resolve_run

        return read_config(resolve_run(target.path)[0])
    if target.kind == "embedded":
        from ..convert.embedded import embedded_model_dir

        return read_config(embedded_model_dir(target.label[5:]))
    return read_config(target.path)


def eval_dtype(targets: list[Target], dtype: str) -> torch.dtype:
    """One dtype for every target (the table compares models, not dtypes): `dtype` as given;
    `auto`: the dtype the first run directory among them trained in (its recipe.yaml), else
    the machine's (model/dtypes.py)."""
    from ..train.runs import decode_dtype

    return decode_dtype(dtype, [t.path for t in targets if t.kind == "run"])


def load_target(target: Target, device: str, dtype: torch.dtype):
    """(model in eval mode on `device`, tokenizer) for a target."""
    import torch

    from ..convert.embedded import embedded_model_dir
    from ..data.tokenizer import Tokenizer
    from ..export.hf_export import merged_model
    from ..export.inference import load_with_adapter

    if target.kind == "gguf":
        return _load_gguf(target.path, device, dtype)
    if target.kind == "run":
        model, base, _, _ = merged_model(target.path)
        tok_dir = base
    else:
        folder = target.path if target.kind == "folder" else embedded_model_dir(target.label[5:])
        model = load_with_adapter(folder, target.adapter, dtype=torch.float32)
        tok_dir = folder
    return model.to(device, dtype).eval(), Tokenizer(tok_dir)


def _load_gguf(path: Path, device: str, dtype: torch.dtype):
    """De-quantize the GGUF through `import-gguf` into a temporary HF folder, and load it."""
    from ..convert.gguf_import import import_gguf
    from ..data.tokenizer import Tokenizer
    from ..model.checkpoint import load_model

    with tempfile.TemporaryDirectory(prefix="gemma3-tune-eval-") as tmp:
        folder = import_gguf(path, Path(tmp) / "model")
        model = load_model(folder, dtype=dtype, device=device)
        tok = Tokenizer(folder)
    return model.eval(), tok
