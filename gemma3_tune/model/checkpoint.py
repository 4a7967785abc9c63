"""Read and write transformers-format Gemma 3 folders (config.json + safetensors).

Our module names are transformers' in-memory names, so the only conversion is a declarative
table of key-prefix rewrites between the layouts that exist on disk:

| layout                              | text decoder            | vision tower                        | projector
|-------------------------------------|-------------------------|-------------------------------------|-------------------------------
| Gemma3ForCausalLM                   | `model.`                | -                                   | -
| published checkpoints (on disk)     | `language_model.model.` | `vision_tower.vision_model.`        | `multi_modal_projector.`
| transformers 5 save_pretrained      | `language_model.model.` | `vision_tower.`                     | `multi_modal_projector.`
| transformers in memory (4.5x / 5.x) | `model.language_model.` | `model.vision_tower.[vision_model.]`| `model.multi_modal_projector.`

We write the published layout by default: every loader (transformers 4 and 5, vLLM) reads it.

Weights load only from safetensors (never pickle). Unknown or missing keys are errors that name
them: there is no `strict=False`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from .config import Gemma3Config, config_from_hf, config_to_hf
from .gemma3 import Gemma3

# (prefix in a file, prefix in our model), per model kind. The first matching row wins.
MULTIMODAL_FROM_HF: list[tuple[str, str]] = [
    ("model.language_model.", "model.language_model."),
    ("language_model.model.", "model.language_model."),
    ("model.vision_tower.vision_model.", "model.vision_tower."),
    ("model.vision_tower.", "model.vision_tower."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),
    ("model.multi_modal_projector.", "model.multi_modal_projector."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
]
TEXT_FROM_HF: list[tuple[str, str]] = [
    ("model.language_model.", "model."),  # text weights saved from a multimodal class
    ("language_model.model.", "model."),
    ("model.", "model."),
]
# Tied LM-head copies: accepted (checked equal to the embeddings) and dropped.
TIED_HEAD_KEYS = {"lm_head.weight", "language_model.lm_head.weight"}


def hf_to_ours(key: str, multimodal: bool) -> str | None:
    for src, dst in MULTIMODAL_FROM_HF if multimodal else TEXT_FROM_HF:
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


def ours_to_hf(key: str, layout: str = "published") -> str:
    """Our key -> transformers key. layout: "published" (the released checkpoints) or "memory"
    (transformers 5's module names)."""
    if layout == "memory":
        return key
    for dst, src in [
        ("language_model.model.", "model.language_model."),
        ("vision_tower.vision_model.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ]:
        if key.startswith(src):
            return dst + key[len(src) :]
    return key


def read_config(path: str | os.PathLike) -> Gemma3Config:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: not found; point model.path at a Gemma 3 HF folder")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}:{e.lineno}: invalid JSON ({e.msg})") from None
    kind = raw.get("model_type")
    if kind not in ("gemma3", "gemma3_text"):
        raise CheckpointError(
            f"{cfg_file}: model_type is {kind!r}, expected 'gemma3' or 'gemma3_text'"
        )
    try:
        return config_from_hf(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a folder: from the index when sharded, else model.safetensors."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: not a valid index (no weight_map)") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists {missing[0]}, which is missing from {path}")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise CheckpointError(
            f"{path}: only pickle weights (*.bin/*.pt) found; we load safetensors only. "
            "Convert with transformers' save_pretrained(safe_serialization=True)"
        )
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def iter_state(
    path: str | os.PathLike, config: Gemma3Config, read: bool = True
) -> Iterator[tuple[str, torch.Tensor | tuple[int, ...]]]:
    """(our key, tensor) for every weight of the folder, one at a time in file order, or (our
    key, shape) with `read=False`. Tied LM-head copies keep their own key (TIED_HEAD_KEYS).
    Unknown keys are an error, raised once every file has been walked.

    Each tensor is a copy of its own, read a few rows at a time (`_read_tensor`): a tensor
    safetensors returns is a view of the file's mapping, and while a view or the file is open,
    every page read through it stays resident (measured on the 4 GB 1B preset: 3.9 GB of RSS
    for one open handle; 1.4 GB, its largest tensor, this way)."""
    unknown: list[str] = []
    for f in weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as st:
                keys = list(st.keys())
            for key in keys:
                ours = key if key in TIED_HEAD_KEYS else hf_to_ours(key, config.is_multimodal)
                if ours is None:
                    unknown.append(key)
                    continue
                if read:
                    value = _read_tensor(f, key)
                else:
                    with safe_open(str(f), framework="pt") as st:
                        value = tuple(st.get_slice(key).get_shape())
                yield ours, value
                del value
        except (SafetensorError, OSError) as e:  # truncated or corrupt file
            raise CheckpointError(
                f"{f}: not a readable safetensors file ({e}); copy or export it again"
            ) from None
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} unknown weight(s), e.g. {', '.join(unknown[:3])}; "
            "is this a Gemma 3 checkpoint matching its config.json?"
        )


def _read_tensor(f: Path, key: str, chunk_bytes: int = 1 << 26) -> torch.Tensor:
    """`key` of safetensors file `f` as a tensor that owns its memory. A tensor up to
    `chunk_bytes` is cloned from its view of the file; a larger one is copied `chunk_bytes` of
    rows at a time, with the file opened for each, so no more than one chunk of the file's
    pages is mapped at once. (Chunks stay above glibc's 32 MB ceiling for its dynamic mmap
    threshold: freeing smaller mmapped blocks raises the threshold, and the heap then keeps
    freed activations, measured as +0.5 GiB peak in a 270M LoRA step.)"""
    with safe_open(str(f), framework="pt") as st:
        sl = st.get_slice(key)
        shape = sl.get_shape()
        first = sl[0:1] if shape and shape[0] else None  # [1, ...]: dtype and bytes per row
        row_bytes = 0 if first is None else first.numel() * first.element_size()
        if first is None or row_bytes * shape[0] <= chunk_bytes:
            return st.get_tensor(key).clone()
    rows = max(1, chunk_bytes // row_bytes)
    out = torch.empty(shape, dtype=first.dtype)
    for a in range(0, shape[0], rows):
        with safe_open(str(f), framework="pt") as st:
            out[a : a + rows] = st.get_slice(key)[a : a + rows]
    return out


def load_state_dict(path: str | os.PathLike, config: Gemma3Config) -> dict[str, torch.Tensor]:
    """Every tensor of the folder, renamed to our keys; unknown keys are an error."""
    out: dict[str, torch.Tensor] = {}
    tied: dict[str, torch.Tensor] = {}
    for key, tensor in iter_state(path, config):
        (tied if key in TIED_HEAD_KEYS else out)[key] = tensor
    embed_key = (
        "model.language_model.embed_tokens.weight"
        if config.is_multimodal
        else "model.embed_tokens.weight"
    )
    for key, head in tied.items():
        emb = out.get(embed_key)
        if emb is not None and (head.shape != emb.shape or not torch.equal(head, emb)):
            raise CheckpointError(f"{path}: {key} differs from the embeddings; Gemma 3 ties them")
    return out


def checked_keys(
    path: str | os.PathLike,
    expected: dict[str, torch.Tensor],
    found: Iterable[tuple[str, torch.Tensor | tuple[int, ...]]],
) -> None:
    """Refuse a folder whose weights (keys and shapes) do not match the model built from its
    config.json. `found`: (key, tensor or shape) pairs; tied LM-head copies are ignored."""
    shapes = {k: tuple(v.shape if isinstance(v, torch.Tensor) else v) for k, v in found}
    for k in TIED_HEAD_KEYS:
        shapes.pop(k, None)
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        what = (
            f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(extra[:3])}"
        )
        raise CheckpointError(f"{path}: weights do not match config.json: {what}")
    for name, param in expected.items():
        if shapes[name] != tuple(param.shape):
            raise CheckpointError(
                f"{path}: {name} has shape {shapes[name]}, config.json implies {tuple(param.shape)}"
            )


def load_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    attn_backend: str = "auto",
) -> Gemma3:
    """Load an HF-format Gemma 3 folder (any layout above) into our model."""
    config = read_config(path)
    state = load_state_dict(path, config)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = Gemma3(config, attn_backend=attn_backend)
    checked_keys(path, model.state_dict(), state.items())
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    model.requires_grad_(True)
    if model.vision_tower is not None:
        model.vision_tower.requires_grad_(False)
    return model.to(device)


def save_model(
    model: Gemma3,
    out: str | os.PathLike,
    *,
    layout: str = "published",
    max_shard_bytes: int = 4 << 30,
    dtype: torch.dtype | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write config.json and (sharded) safetensors that transformers 5 loads."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {}
    for k, v in state.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[ours_to_hf(k, layout)] = v.contiguous()
    some = next(iter(tensors.values()))
    cfg = config_to_hf(model.config, dtype=str(some.dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
