"""CUDA checks (`pytest -m gpu`, run by scripts/gpu_check.sh); skipped on a machine without CUDA.

FlexAttention equals SDPA forward and backward on a packed row with images; a packed row
equals its documents alone; compiled layers equal eager; QLoRA (bitsandbytes NF4) trains;
bf16 `gemma3-tune train` runs on the tiny and 1B presets; ZeRO-2 and ZeRO-3 run under torchrun
on one GPU; `generate` decodes on CUDA with the cache equal to recomputation.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from test_compile import IMG, _lora_model, _loss_and_grads, _packed_batch
from trainutil import chat_set, losses, write_recipe

from gemma3_tune.model import preset

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _vision_cfg():
    return preset("tiny-vision").replace(image_token_id=IMG, boi_token_id=498, eoi_token_id=499)


def _on_cuda(batch: dict) -> dict:
    return {k: v.cuda() for k, v in batch.items()}


def _close(got: dict, want: dict, tol: float) -> None:
    for n in want:
        scale = max(1.0, want[n].abs().max().item())
        assert (got[n] - want[n]).abs().max().item() <= tol * scale, n


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 off: these checks compare fp32 results to 1e-5."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_flex_equals_sdpa_forward_and_backward(compiled):
    sdpa = _lora_model(_vision_cfg()).cuda()
    flex = copy.deepcopy(sdpa)
    flex.get_base_model().attn_backend = "flex"
    if compiled:
        flex.get_base_model().compile_layers()
    batch = _on_cuda(_packed_batch(vision=True))
    want_loss, want = _loss_and_grads(sdpa, batch)
    got_loss, got = _loss_and_grads(flex, batch)
    assert abs(got_loss - want_loss) <= 1e-5 * max(1.0, abs(want_loss))
    _close(got, want, 1e-4)


def test_packed_row_equals_documents_alone_with_flex():
    model = _lora_model(preset("tiny")).cuda()
    model.get_base_model().attn_backend = "flex"
    g = torch.Generator().manual_seed(2)
    a, b = (
        torch.randint(4, 490, (1, 300), generator=g),
        torch.randint(4, 490, (1, 212), generator=g),
    )
    row = torch.cat([a, b], 1).cuda()
    pos = torch.cat([torch.arange(300), torch.arange(212)])[None].cuda()
    labels = row.clone()
    labels[0, 300] = -100  # document b's first token is not predicted from document a
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=pos, labels=labels).loss.item()
        la = model(input_ids=a.cuda(), labels=a.cuda()).loss.item()
        lb = model(input_ids=b.cuda(), labels=b.cuda()).loss.item()
    assert abs(packed - (la * 299 + lb * 211) / 510) <= 1e-5


def _train(tmp_path, model_dir, **over) -> list[float]:
    from gemma3_tune.cli import main

    data = chat_set(tmp_path / "chat.jsonl", n=48)
    r = write_recipe(tmp_path / "r.yaml", model_dir, data, tmp_path / "run", **over)
    assert main(["train", str(r)]) == 0
    return losses(tmp_path / "run")


def test_qlora_trains_on_cuda(tmp_path, tiny_dir):
    got = _train(tmp_path, tiny_dir, method="qlora", model__dtype="bfloat16")
    assert got[-1] < 0.5 * got[0], got


@pytest.mark.parametrize("name", ["tiny", "1b"])
def test_bf16_cli_training(name, tmp_path, tiny_dir):
    from gemma3_tune.cli import main

    model_dir = tiny_dir
    if name != "tiny":
        model_dir = tmp_path / name
        assert main(["init-model", "--preset", name, "--out", str(model_dir)]) == 0
    got = _train(
        tmp_path, model_dir, model__dtype="auto", training__max_steps=12, data__max_seq_len=512
    )
    assert all(x == x for x in got) and got[-1] < got[0], got  # finite, and it learns


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_torchrun_zero_on_one_gpu(stage, tmp_path, tiny_dir):
    data = chat_set(tmp_path / "chat.jsonl", n=24)
    r = write_recipe(
        tmp_path / "r.yaml", tiny_dir, data, tmp_path / "run", model__dtype="bfloat16",
        deepspeed=stage, training__max_steps=6,
    )  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           "-m", "gemma3_tune", "train", str(r)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    got = losses(tmp_path / "run")
    assert len(got) >= 6 and got[-1] < got[0], got


def test_generate_on_cuda_cache_equals_recompute(tiny_dir):
    from gemma3_tune.model import load_model
    from gemma3_tune.model.generate import generate

    model = load_model(tiny_dir, device="cuda").eval()
    prompt = torch.randint(4, 490, (1, 40), device="cuda")  # past the window (16)
    cached = list(generate(model, prompt, max_new_tokens=30))
    plain = list(generate(model, prompt, max_new_tokens=30, use_cache=False))
    assert len(cached) == 30 and cached == plain
