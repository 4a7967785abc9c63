"""Multi-process setup: DeepSpeed ZeRO-2/3 through HF Trainer's integration, plain DDP otherwise.

Under ZeRO-3 the model is built inside `deepspeed.zero.Init`, which partitions each module's
parameters as soon as it is constructed, so no rank ever holds the whole model; rank 0 then
streams the checkpoint one tensor at a time into the gathered parameter.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..model.checkpoint import hf_to_ours, read_config, weight_files
from ..model.gemma3 import Gemma3


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def images_needed(partitioned: bool) -> Callable[[int, torch.device], int]:
    """The model's `images_needed` (Gemma3._stand_in): what every data-parallel rank must run
    of the vision path this step, given what this rank's batch runs (2 tower and projector,
    1 projector on cached features, 0 neither). One process: nothing (0). DDP and ZeRO-2: the
    projector (1), so its gradient exists on every rank. ZeRO-3 (`partitioned`): the most any
    rank runs, agreed by one all-reduce, since a partitioned module runs on all ranks or none."""

    def need(mine: int, device: torch.device) -> int:
        dist = torch.distributed
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return 0
        if not partitioned:
            return 1
        flag = torch.tensor([mine], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return max(1, int(flag.item()))

    return need


def _ranks() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def device() -> str:
    """This process's device: its local rank's GPU, or the CPU (where a collective's tensors
    live too: nccl on the GPU, gloo on the CPU)."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def all_done() -> Callable[[bool], bool]:
    """For decoding under ZeRO-3 (model/generate `stop`): whether every rank's completions are
    done, agreed by one all-reduce per token, so that all ranks run the same forwards (each
    gathers the sharded weights with the others)."""

    def stop(mine: bool) -> bool:
        if _ranks() == 1:
            return mine
        flag = torch.tensor([int(mine)], device=device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    return stop


def gather_to_main(items: list) -> list:
    """Every rank's `items`, concatenated in rank order, on rank 0 (the others get [])."""
    if _ranks() == 1:
        return items
    dist = torch.distributed
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(items, out, dst=0)
    return [x for part in out for x in part] if out is not None else []


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the ranks (a copy; `t` itself when there is one process)."""
    if _ranks() == 1:
        return t
    t = t.to(device()).clone()
    torch.distributed.all_reduce(t)
    return t


def init_distributed(use_deepspeed: bool, timeout_s: int = 1800) -> None:
    """DeepSpeed needs its process group before the model is built; gloo on CPU, nccl on GPU.
    (Without DeepSpeed the Trainer creates it, with the same `ddp_timeout`.)"""
    if not use_deepspeed or world_size() == 1 and "RANK" not in os.environ:
        return
    from datetime import timedelta

    import deepspeed

    deepspeed.init_distributed(
        dist_backend="nccl" if torch.cuda.is_available() else "gloo",
        timeout=timedelta(seconds=timeout_s),
    )


def finish() -> None:
    """End the process group once every rank has saved: left to the interpreter's exit, gloo's
    destructor can race its own threads and abort a rank after a run that succeeded
    ("terminate called without an active exception", SIGABRT, seen under a loaded CPU)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def zero_to_universal(ckpt: Path, wrote: int, now: int, wait_seconds: float = 3600) -> None:
    """Make a DeepSpeed checkpoint written by `wrote` processes loadable by `now` of them:
    DeepSpeed's `ds_to_universal` gathers each parameter's ZeRO fragments (weights and Adam
    moments) into per-parameter files, which any world size can load again. Global rank 0
    converts, into a temporary folder renamed when done, and writes `latest_universal` last;
    the other ranks wait for that file. Done once per checkpoint."""
    import subprocess
    import sys

    from ..outputs import wait_for_file

    done = ckpt / "latest_universal"
    if done.is_file():
        return
    if int(os.environ.get("RANK", "0")) != 0:
        wait_for_file(done, wait_seconds, f"rank 0 to convert {ckpt}")
        return
    tag = (ckpt / "latest").read_text().strip()  # e.g. global_step3
    print(
        f"{ckpt.name} was written by {wrote} processes, resuming with {now}: converting its"
        " ZeRO states to DeepSpeed's universal checkpoint",
        file=sys.stderr,
    )
    tmp, final = ckpt / f".{tag}_universal.partial", ckpt / f"{tag}_universal"
    for stale in (tmp, final):
        if stale.exists():
            shutil.rmtree(stale)
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(ckpt / tag), "--output_folder", str(tmp),
        "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    os.rename(tmp, final)
    (ckpt / ".latest_universal.tmp").write_text(final.name)
    os.replace(ckpt / ".latest_universal.tmp", done)


def load_model_zero3(
    folder: Path, dtype: torch.dtype, ds_config: dict, attn_backend: str = "auto"
) -> Gemma3:
    import deepspeed
    from safetensors import safe_open

    config = read_config(folder)
    # The dtype comes from the config's bf16/fp16 flags (the Trainer fills them from the
    # recipe). Passing `dtype=` as well is not safe: DeepSpeed 0.19 then picks bf16 on CPU
    # whatever was asked (an operator-precedence slip in Init._set_dtype), so check.
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Gemma3(config, attn_backend=attn_backend)
    built = model.text_model.embed_tokens.weight.dtype
    if built != dtype:
        raise RuntimeError(f"ZeRO-3 built the model in {built}, the recipe asks for {dtype}")
    params = dict(model.named_parameters())
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    seen = set()
    # Every rank walks the same key order; only rank 0 reads tensors from disk.
    keys: list[tuple[Path, str, str]] = []
    for f in weight_files(folder):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                ours = hf_to_ours(key, config.is_multimodal)
                if ours in params:
                    keys.append((f, key, ours))
    for f, key, ours in keys:
        p = params[ours]
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if rank == 0:
                with safe_open(str(f), framework="pt") as st:
                    p.data.copy_(st.get_tensor(key).to(p.dtype))
        seen.add(ours)
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(f"{folder}: weights missing for {', '.join(missing[:3])}")
    gather_tied_embedding(model)
    return model


def gather_tied_embedding(model: Gemma3) -> None:
    """ZeRO-3: the tied LM head reads the embedding matrix outside the embedding's own forward,
    so ZeRO-3 must gather it whenever the whole model runs. Called on the loaded model, and
    again once peft wraps a trained embedding (`embed_tokens.weight` is then peft's copy)."""
    import deepspeed

    deepspeed.zero.register_external_parameter(model, model.text_model.embed_tokens.weight)


def wait_for_local_main(done: Callable[[], bool], what: str, seconds: float = 6 * 3600) -> None:
    """On a rank other than local rank 0: poll until `done()` (local rank 0 writes what this
    rank reads: a teacher's answers, the self text), or fail after `seconds`."""
    import time

    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {seconds:.0f} s for local rank 0 to {what}")
        time.sleep(2.0)
