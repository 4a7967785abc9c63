"""`export RUN --checkpoint N --merge` of a ZeRO-3 run (2 processes, gloo, no GPU), full SFT and
LoRA (also with a trained embedding, peft's copy gathered for the tied head): the exported model's
logits equal the live model's at that step (the run's last step, whose weights the run also saved
itself, gathered, as model/ or adapter/)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from trainutil import chat_set, free_port, write_recipe

from gemma3_tune.cli import main
from gemma3_tune.export.hf_export import probe_ids
from gemma3_tune.export.inference import load_with_adapter
from gemma3_tune.model import load_model

pytestmark = pytest.mark.slow  # multi-process launches: outside the fast tier


@pytest.mark.parametrize("method", ["full", "lora", "lora_embeddings"])
def test_zero3_checkpoint_exports_the_live_weights(method, tmp_path, tiny_dir):
    data = chat_set(tmp_path / "chat.jsonl", n=16)
    run = tmp_path / "run"
    embeddings = method == "lora_embeddings"
    method = method.removesuffix("_embeddings")
    r = write_recipe(
        tmp_path / "r.yaml", tiny_dir, data, run, method=method, deepspeed="zero3",
        training__max_steps=4, training__save_steps=2, training__micro_batch_size=1,
        **({"train_embeddings": True} if embeddings else {}),
    )  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "gemma3_tune", "train", str(r)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    if method == "full":  # the checkpoint holds ZeRO partitions; export gathers them on CPU
        assert list((run / "checkpoint-4").glob("global_step4/*zero_pp_rank_1*"))
    out = tmp_path / "export"
    assert (
        main(["export", str(run), "--out", str(out), "--checkpoint", "4", "--dtype", "float32"])
        == 0
    )
    live = (
        load_model(run / "model")
        if method == "full"
        else load_with_adapter(tiny_dir, run / "adapter", dtype=torch.float32)
    )
    exported = load_model(out)
    ids, _ = probe_ids(live)
    with torch.no_grad():
        want, got = live.eval()(ids).logits, exported.eval()(ids).logits
    assert (got - want).abs().max().item() <= 1e-5
    base = load_model(tiny_dir).eval()
    with torch.no_grad():  # and training did change the model
        assert (base(ids).logits - want).abs().max().item() > 1e-2
    if embeddings:
        moved = live.text_model.embed_tokens.weight - base.text_model.embed_tokens.weight
        assert moved.abs().max().item() > 1e-4
