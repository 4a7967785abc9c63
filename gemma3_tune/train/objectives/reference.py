"""DPO's reference log-probabilities, computed once before training and read from disk.

DPO compares the policy's log-probability of each reply with a frozen reference's. The
reference never changes, so its numbers are prepared data: local rank 0 runs the reference
over every prepared pair (train and eval) before the policy loads, in batches of the training
micro-batch, and writes one array, `logps.npy` float64 [samples, 2] (chosen, rejected; the
sum over the reply's tokens), indexed like the prepared samples and memory-mapped when read.
The step then runs one model, and a second run on the same data and reference reads the file.

`preference.reference: base` is the model the policy starts from, loaded as training loads
it (QLoRA: the same NF4 base, so the policy's first step has rewards of 0); for LoRA this is
the model with its adapter off, as TRL's default. `reference: PATH` is an HF folder or a run
directory (its adapter folded in). The folder's key covers the prepared data (its key and rows
digest), the reference's files, dtype and quantization, so another reference never reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ...data.collate import row_features
from ...errors import UserError
from ...outputs import wait_for_file
from ..recipe import Recipe, model_dir

COMPLETE = "COMPLETE"
FORMAT_VERSION = 1


def resolve_reference(recipe: Recipe) -> tuple[Path, Path | None, Path | None]:
    """(base folder, adapter folder or None, run folder or None) of `preference.reference`."""
    text = recipe.preference.reference
    if text == "base":
        return model_dir(recipe), None, None
    p = Path(text).expanduser()
    p = p if p.is_absolute() else recipe.base_dir / p
    if (p / "config.json").is_file():
        return p, None, None
    if (p / "recipe.yaml").is_file():
        from ..runs import resolve_run

        base, adapter = resolve_run(p)
        return base, adapter, p
    raise UserError(
        f"preference.reference: {p} is neither 'base', a Gemma 3 HF folder (config.json) nor a"
        " run directory (recipe.yaml)"
    )


def _inputs(recipe: Recipe, data, dtype: torch.dtype) -> dict:
    from ...data.prepare import source_fingerprint

    base, adapter, _ = resolve_reference(recipe)
    quantized = recipe.preference.reference == "base" and recipe.method == "qlora"
    return {
        "format": FORMAT_VERSION,
        "data": data.folder.name,
        "rows": data.digest(),
        "reference": str(base),
        "files": source_fingerprint(base),
        "adapter": None if adapter is None else source_fingerprint(adapter),
        "dtype": str(dtype),
        "nf4": quantized,
    }


def folder_for(recipe: Recipe, data, dtype: torch.dtype) -> tuple[Path, dict]:
    inputs = _inputs(recipe, data, dtype)
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    return data.folder.parent / "reference" / key[:24], inputs


def load_reference(recipe: Recipe, dtype: torch.dtype, device: str):
    """The reference in eval mode, frozen."""
    from ...model.checkpoint import load_model
    from ..runs import apply_adapter, run_method

    base, adapter, run = resolve_reference(recipe)
    if recipe.preference.reference == "base" and recipe.method == "qlora":
        from ..qlora import load_quantized

        model = load_quantized(base, dtype, device, recipe.model.attn_backend)
    else:
        model = load_model(base, dtype=torch.float32, attn_backend=recipe.model.attn_backend)
        if run is not None and run_method(run) == "qlora":
            from ..qlora import dequantize_like_run

            dequantize_like_run(model, run)
        model = apply_adapter(model, adapter).to(device, dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def score_rows(model, rows, collate, batch_rows: int, device: str, out: np.ndarray) -> int:
    """Each pair's (chosen, rejected) reply log-probabilities into out[sample index], for the
    prepared rows `rows` (PreparedRows). Returns the pairs scored."""
    from ...progress import bar as progress_bar
    from .preference_loss import pairs

    bar = progress_bar(len(rows), "reference log-probs", "row")
    done = 0
    for start in range(0, len(rows), batch_rows):
        chunk = list(range(start, min(len(rows), start + batch_rows)))
        batch = collate([row_features(rows[i]) for i in chunk])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        batch.pop("row_ids", None)
        res = model(**batch, sequence_logps=True)
        logps, _ = pairs(res["logps"], res["tokens"])  # [P, 2]
        idx = np.concatenate([rows.indices(i) for i in chunk]).astype(np.int64)
        if len(idx) != logps.shape[0]:
            raise RuntimeError(f"reference: {len(idx)} pairs in the rows, {logps.shape[0]} scored")
        out[idx] = logps.double().cpu().numpy()
        done += len(idx)
        bar.update(len(chunk))
    bar.close()
    return done


def reference_logps(
    recipe: Recipe, data, collate, dtype: torch.dtype, device: str, wait_seconds: float = 6 * 3600
) -> np.ndarray:
    """[samples, 2] float64, memory-mapped: from the cache, waited for (local ranks > 0), or
    computed now by the reference (loaded, used, freed before the policy loads)."""
    folder, inputs = folder_for(recipe, data, dtype)
    path = folder / "logps.npy"
    if (folder / COMPLETE).is_file():
        return np.load(path, mmap_mode="r")
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        wait_for_file(folder / COMPLETE, wait_seconds, f"local rank 0 to fill {folder}")
        return np.load(path, mmap_mode="r")
    n = len(data.train_rows.samples)
    out = np.full((n, 2), np.nan)
    t0 = time.perf_counter()
    print(f"loading reference {recipe.preference.reference}", file=sys.stderr)
    model = load_reference(recipe, dtype, device)
    batch_rows = recipe.training.micro_batch_size
    pairs = score_rows(model, data.train_rows, collate, batch_rows, device, out)
    pairs += score_rows(model, data.eval_rows, collate, batch_rows, device, out)
    del model
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "key.json").write_text(json.dumps(inputs, indent=1, sort_keys=True, default=str))
    tmp = folder / f".logps.tmp-{os.getpid()}.npy"
    np.save(tmp, out)
    os.replace(tmp, path)
    (folder / COMPLETE).write_text(json.dumps({"pairs": pairs}) + "\n")
    print(
        f"reference log-probs: {pairs} pairs in {time.perf_counter() - t0:.1f} s, in {folder}",
        file=sys.stderr,
    )
    return np.load(path, mmap_mode="r")


def row_reference(logps: np.ndarray, rows, i: int) -> np.ndarray:
    """The reference log-probs [pairs in row i, 2] of a prepared row, in the row's order."""
    return np.asarray(logps[rows.indices(i)], dtype=np.float64)
