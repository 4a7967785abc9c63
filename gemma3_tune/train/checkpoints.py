"""Checkpoints that are either complete or ignored, and rotation that never loses the last one.

The HF Trainer writes `checkpoint-N/` file by file (weights, optimizer, scheduler, RNG states,
trainer_state.json). A kill in the middle leaves a folder that looks like a checkpoint. So once
every rank has finished writing, we add a marker, `COMPLETE.json`, written atomically (temp file,
fsync, rename) and listing every file with its size. Resume only considers checkpoints whose
marker is present and whose files still match it; the others are removed before training
starts. Rotation (`save_total_limit`) is ours too, run after the marker is written: the
Trainer's own rotation runs before any callback, so a kill between its deletion of the old
checkpoint and our marker on the new one would leave nothing to resume from.

Pickles: the Trainer and DeepSpeed save optimizer, scheduler and RNG states with `torch.save`
(a pickle), and DeepSpeed loads its own with `weights_only=False`, which would run any code a
tampered file carries. So before a checkpoint is resumed or exported, `verify_pickles` loads
every pickle in it with `torch.load(weights_only=True)` (memory-mapped: the tensors are not
read), allowing only tensors, containers, numbers and the few plain-data classes the Trainer
and DeepSpeed write (numpy arrays for RNG states, DeepSpeed's ZeRO stage enum, loss scaler and
fragment address). `training_args.bin` (a pickled TrainingArguments that nothing reads back)
is deleted when the checkpoint is marked complete.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..errors import UserError
from ..outputs import plain_modes, write_atomic

MARKER = "COMPLETE.json"
PREFIX = "checkpoint-"


def _step(p: Path) -> int:
    try:
        return int(p.name.removeprefix(PREFIX))
    except ValueError:
        return -1


def checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    return sorted((p for p in out.glob(f"{PREFIX}*") if p.is_dir() and _step(p) >= 0), key=_step)


def _files(ckpt: Path) -> dict[str, int]:
    return {
        p.relative_to(ckpt).as_posix(): p.stat().st_size
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


PICKLED = (".pt", ".pth", ".bin")
UNREAD = "training_args.bin"  # HF's pickled TrainingArguments: written, never read back


def _plain_data_classes() -> list:
    """The non-tensor classes a checkpoint may hold: numpy (RNG states) and, for ZeRO
    checkpoints, DeepSpeed's plain-data ones."""
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return allowed
    return [*allowed, ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def verify_pickles(ckpt: Path) -> None:
    """Refuse a checkpoint holding a pickle that is more than tensors and plain data."""
    files = [
        p
        for p in sorted(ckpt.rglob("*"))
        if p.suffix in PICKLED and p.name != UNREAD and p.is_file()
    ]
    if not files:
        return
    with torch.serialization.safe_globals(_plain_data_classes()):
        for f in files:
            try:
                try:
                    torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:  # the legacy (non-zip) format cannot be mapped
                    if "mmap" not in str(e):
                        raise
                    torch.load(f, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
                found = re.search(r"GLOBAL ([\w.]+)", str(e))
                why = f"it names {found[1]}" if found else str(e).splitlines()[0]
                raise UserError(
                    f"{f}: refused to load: not only tensors and plain data ({why}); gemma3-tune"
                    f" never writes such a file, so it was altered or comes from elsewhere."
                    f" Delete {ckpt.name} or use another checkpoint"
                ) from None


def mark_complete(ckpt: Path, world_size: int = 1, global_batch: int | None = None) -> None:
    """Flush every file of the checkpoint to disk, then commit it with the marker (which also
    records how many processes wrote it: resuming on another number converts ZeRO states)."""
    (ckpt / UNREAD).unlink(missing_ok=True)
    (ckpt / "README.md").unlink(missing_ok=True)  # peft's blank template; the run has ours
    plain_modes(ckpt)  # the Trainer's safetensors files are 0600 whatever the umask
    files = _files(ckpt)
    for name in files:
        fd = os.open(ckpt / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    marker = {"step": _step(ckpt), "world_size": world_size, "global_batch": global_batch}
    marker["files"] = files
    write_atomic(ckpt / MARKER, json.dumps(marker, indent=1))


def written_by(ckpt: Path) -> tuple[int | None, int | None]:
    """(processes, global batch) of the run that wrote a complete checkpoint (None: not
    recorded, as in checkpoints from before these fields)."""
    try:
        marker = json.loads((ckpt / MARKER).read_text())
    except (OSError, ValueError):
        return None, None
    return marker.get("world_size"), marker.get("global_batch")


def is_complete(ckpt: Path) -> bool:
    try:
        listed = json.loads((ckpt / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((ckpt / n).is_file() and (ckpt / n).stat().st_size == s for n, s in listed.items())


def newest_complete(out: Path) -> Path | None:
    done = [p for p in checkpoints(out) if is_complete(p)]
    return done[-1] if done else None


def remove_incomplete(out: Path) -> list[Path]:
    """Delete checkpoint folders a kill left half-written (no valid marker)."""
    gone = [p for p in checkpoints(out) if not is_complete(p)]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def rotate(out: Path, keep: int | None) -> list[Path]:
    """Keep the `keep` newest complete checkpoints; never touch the newest complete one, and
    never count a half-written one as a reason to delete a complete one."""
    if keep is None:
        return []
    done = [p for p in checkpoints(out) if is_complete(p)]
    old = done[: max(len(done) - max(keep, 1), 0)]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


class CompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once all ranks wrote it, then applies save_total_limit.
    `add_files(ckpt)` runs on rank 0 before the marker: what our run folders carry besides the
    Trainer's files (the base's tokenizer files, a portable adapter_config.json)."""

    def __init__(
        self,
        out: Path,
        save_total_limit: int | None,
        add_files: Callable[[Path], None] | None = None,
    ):
        self.out, self.keep, self.add_files = out, save_total_limit, add_files

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's shard (ZeRO) is on disk before the marker
        if state.is_world_process_zero:
            ckpt = self.out / f"{PREFIX}{state.global_step}"
            if ckpt.is_dir():
                if self.add_files is not None:
                    self.add_files(ckpt)
                batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
                mark_complete(ckpt, args.world_size, batch * args.world_size)
                for p in rotate(self.out, self.keep):
                    print(f"removed old checkpoint {p.name} (save_total_limit)", file=sys.stderr)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return control
