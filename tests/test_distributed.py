"""2 CPU processes (torchrun, gloo): ZeRO-2 and ZeRO-3 log the losses of one process with the
same global batch, and ZeRO-3 saves a complete adapter."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from trainutil import chat_set, colour_set, free_port, losses, write_recipe

pytestmark = pytest.mark.slow  # multi-process launches: outside the fast tier


def _torchrun(recipe: Path, *overrides: str, timeout: int = 900, ok: bool = True) -> str:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "gemma3_tune", "train", str(recipe), *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert (done.returncode == 0) == ok, done.stderr[-3000:]
    return done.stderr


def _adapter(path: Path) -> dict[str, tuple]:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_vision_dir):
    from gemma3_tune.cli import main

    d = tmp_path_factory.mktemp("dist")
    data = chat_set(d / "chat.jsonl", n=32)
    # global batch 4: 1 process x micro 1 x accum 4 here; 2 processes x micro 1 x accum 2 below
    r = write_recipe(
        d / "r.yaml", tiny_vision_dir, data, d / "single",
        training__max_steps=5, training__micro_batch_size=1, training__grad_accum=4, training__save_steps=5,
    )  # fmt: skip
    assert main(["train", str(r)]) == 0
    return d, r


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_matches_single_process(stage, single):
    d, r = single
    _torchrun(r, f"deepspeed={stage}", "training.grad_accum=2", f"training.output_dir={d / stage}")
    want, got = losses(d / "single"), losses(d / stage)
    assert len(got) == len(want) == 5
    for a, b in zip(want, got, strict=True):
        assert abs(a - b) / abs(a) <= 1e-5, (want, got)
    assert _adapter(d / stage / "adapter") == _adapter(
        d / "single" / "adapter"
    )  # complete: every tensor, full shape
    cfg = json.loads((d / stage / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny_vision_dir):
    """1 image sample and 7 text-only ones, micro-batch 1, 2 ranks, 4 steps (one epoch): at the
    image's step one rank holds it and the other only text; at the other three steps no rank
    has an image. The projector trains. Runs: one process with grad_accum 2 (the same global
    batch), and plain DDP, the references for the ZeRO stages."""
    from gemma3_tune.cli import main

    d = tmp_path_factory.mktemp("mixed")
    data = colour_set(d / "img", 1, seed=3, with_text_only=7)
    r = write_recipe(
        d / "r.yaml", tiny_vision_dir, data, d / "single",
        train_projector=True,
        data__packing=False,
        training__max_steps=4, training__micro_batch_size=1, training__save_steps=4,
    )  # fmt: skip
    assert main(["train", str(r), "training.grad_accum=2"]) == 0
    _torchrun(r, f"training.output_dir={d / 'ddp'}", timeout=420)
    return d, r


def test_mixed_image_and_text_ranks_ddp(mixed, tiny_vision_dir):
    """DDP gives the projector a zero gradient on the text-only rank (a rank that skipped it
    would fail the gradient reduction) and logs the single process's losses. Its LoRA weights
    equal the single process's; its projector trained (the image's step moved it). The
    projector itself differs from the single process's by design: there the image-less steps
    give it no gradient, so AdamW skips it; here they give it a zero gradient, and AdamW's
    momentum moves it on, as in every data-parallel trainer."""
    d, _ = mixed
    want, got = losses(d / "single"), losses(d / "ddp")
    assert len(got) == 4 and all(math.isfinite(x) for x in got), got
    assert got == pytest.approx(want, rel=1e-5)
    single, ddp = _tensors(d / "single" / "adapter"), _tensors(d / "ddp" / "adapter")
    assert single.keys() == ddp.keys()
    lora = [k for k in ddp if "lora_" in k]
    assert len(lora) > 0
    for k in lora:
        torch.testing.assert_close(ddp[k], single[k], rtol=0, atol=1e-5)
    with safe_open(str(tiny_vision_dir / "model.safetensors"), "pt") as f:
        base = f.get_tensor("multi_modal_projector.mm_input_projection_weight")
    trained = ddp["base_model.model.model.multi_modal_projector.mm_input_projection_weight"]
    assert (trained - base.float()).abs().max() > 1e-3  # the image's step trained it


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_mixed_image_and_text_ranks_zero(stage, mixed):
    """The same run under ZeRO-2 and ZeRO-3 completes, logs the single process's losses, and
    ends with DDP's adapter, projector included. Under ZeRO-3 this needs the text-only rank to
    run the tower on a stand-in image (else the ranks' weight gathers differ and the collective
    fails) and the projector to run at image-less steps too (else ZeRO-3 reuses its previous
    step's gradient: the projector then ends 7e-3 away from DDP's)."""
    d, r = mixed
    _torchrun(r, f"deepspeed={stage}", f"training.output_dir={d / stage}", timeout=420)
    want, got = losses(d / "single"), losses(d / stage)
    assert len(got) == 4 and all(math.isfinite(x) for x in got), got
    assert got == pytest.approx(want, rel=1e-5)
    ddp, ours = _tensors(d / "ddp" / "adapter"), _tensors(d / stage / "adapter")
    assert ours.keys() == ddp.keys()
    for k in ddp:
        torch.testing.assert_close(ours[k], ddp[k], rtol=0, atol=1e-5, msg=k)


def test_zero3_feature_cache_is_filled_before_training(mixed, tmp_path):
    """Under ZeRO-3 a cache miss in one rank's collator would run the partitioned tower on that
    rank alone and hang the others; the cache is filled (tower gathered once) before training.
    Its entries equal a single process's (same key, so the tower's fingerprint was taken over
    the whole weights, and the same features), and the run logs the single process's losses."""
    from gemma3_tune.cli import main

    d, r = mixed
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    assert main(["train", str(r), f"data.feature_cache={alone}", "training.grad_accum=2",
                 f"training.output_dir={tmp_path / 'single'}"]) == 0  # fmt: skip
    _torchrun(r, "deepspeed=zero3", f"data.feature_cache={shared}",
              f"training.output_dir={tmp_path / 'z3'}", timeout=420)  # fmt: skip
    entries = sorted(p.name for p in alone.iterdir())
    assert len(entries) == 1 and sorted(p.name for p in shared.iterdir()) == entries
    torch.testing.assert_close(
        load_file(str(shared / entries[0]))["features"],
        load_file(str(alone / entries[0]))["features"],
        rtol=0, atol=1e-5,
    )  # fmt: skip
    assert losses(tmp_path / "z3") == pytest.approx(losses(d / "single"), rel=1e-5)
