"""CUDA checks (`pytest -m gpu`, run by scripts/gpu_check.sh); skipped on a machine without CUDA.

`gpu_long` marks the ones that train through the CLI or torchrun, or need bitsandbytes: the
second call of the GPU check (`scripts/gpu_check.sh --stage 2`) runs them; the first runs the
rest in the time its bench leaves.

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
def _fresh_dynamo():
    """Each test compiles from a clean slate: no graphs of an earlier test count against its
    recompile limit, and `bound_recompiles` (a training run sets it) does not outlive it."""
    import torch._dynamo.config as dynamo

    saved = dynamo.recompile_limit, dynamo.fail_on_recompile_limit_hit
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    dynamo.recompile_limit, dynamo.fail_on_recompile_limit_hit = saved


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


def test_checkpointed_compiled_flex_equals_sdpa():
    """Gradient checkpointing around compiled FlexAttention layers (each layer recomputed in
    backward, its block masks reused): loss and every LoRA gradient equal eager SDPA's."""
    sdpa = _lora_model(_vision_cfg()).cuda()
    flex = copy.deepcopy(sdpa)
    base = flex.get_base_model()
    base.attn_backend = "flex"
    base.compile_layers()
    base.gradient_checkpointing_enable()
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


@pytest.mark.gpu_long
def test_qlora_trains_on_cuda(tmp_path, tiny_dir):
    got = _train(tmp_path, tiny_dir, method="qlora", model__dtype="bfloat16")
    assert got[-1] < 0.5 * got[0], got


@pytest.mark.gpu_long
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


@pytest.mark.gpu_long
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


# -- issue 22: what the CPU tests could only reproduce, confirmed on the card -------------------


def _hd256_cfg():
    """1B shapes (head_dim 256, GQA 4:1, window 512) in two layers, one of each type."""
    from gemma3_tune.model.config import GLOBAL, SLIDING

    return preset("1b").replace(num_hidden_layers=2, layer_types=[SLIDING, GLOBAL])


def test_flex_equals_sdpa_at_head_dim_256():
    sdpa = _lora_model(_hd256_cfg()).cuda()
    flex = copy.deepcopy(sdpa)
    flex.get_base_model().attn_backend = "flex"
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, 200000, (1, 2048), generator=g)
    pos = torch.cat([torch.arange(1000), torch.arange(700), torch.arange(348)])[None]
    batch = _on_cuda({"input_ids": ids, "position_ids": pos, "labels": ids.clone()})
    want_loss, want = _loss_and_grads(sdpa, batch)
    got_loss, got = _loss_and_grads(flex, batch)
    assert abs(got_loss - want_loss) <= 1e-5 * max(1.0, abs(want_loss))
    _close(got, want, 1e-4)


def test_small_card_flex_tiles_equal_torch_defaults():
    """The tiles flex_kernels.py picks for ~100 KB cards (L40S, 4090), forced on this card:
    forward and backward equal torch's default tiles (bf16 tolerance)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from gemma3_tune.model.flex_kernels import flex_kernel_options

    options = flex_kernel_options(256, 101376, (8, 9))
    assert isinstance(options, dict)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 4, 1024, 256, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (
        torch.randn(1, 1, 1024, 256, device="cuda", dtype=torch.bfloat16, generator=g) for _ in "kv"
    )
    bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, 1, None, 1024, 1024, device="cuda")
    fn = torch.compile(flex_attention, dynamic=False)
    results = []
    for opts in (None, options):
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = fn(qq, kk, vv, block_mask=bm, enable_gqa=True, kernel_options=opts)
        out.float().square().sum().backward()
        results.append([out.float(), qq.grad.float(), kk.grad.float(), vv.grad.float()])
    for a, b in zip(*results, strict=True):
        assert (a - b).abs().max().item() <= 2e-2 * max(1.0, b.abs().max().item())


@pytest.mark.gpu_long
def test_nf4_base_is_the_same_on_cpu_and_cuda():
    """The export rebuilds a GPU run's NF4 base on whatever it runs on: bitsandbytes' CPU and
    CUDA quantization must agree bit for bit."""
    from gemma3_tune.train.qlora import dequantized_base

    w = (torch.randn(1152, 6912) * 0.02).to(torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(dequantized_base(w, dtype, "cpu"), dequantized_base(w, dtype, "cuda"))


@pytest.mark.gpu_long
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qlora_export_merges_onto_the_cuda_base(dtype, tmp_path, tiny_dir):
    from test_qlora import test_export_merges_onto_the_trained_base

    test_export_merges_onto_the_trained_base(dtype, tmp_path, tiny_dir)


@pytest.mark.gpu_long
@pytest.mark.parametrize("method", ["projector_only", "lora_projector", "full"])
def test_bf16_updates_land_on_cuda(method, tmp_path, tiny_vision_dir):
    from test_precision import test_bf16_updates_equal_fp32_masters

    test_bf16_updates_equal_fp32_masters(method, tmp_path, tiny_vision_dir)


def test_sdpa_with_expanded_kv_equals_query_chunks():
    from gemma3_tune.model.attention import sdpa_dense, sdpa_query_chunks
    from gemma3_tune.model.masks import token_info, visible

    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(2, 8, 1100, 64, device="cuda", generator=g)
    k, v = (torch.randn(2, 2, 1100, 64, device="cuda", generator=g) for _ in "kv")
    pos = torch.cat([torch.arange(600), torch.arange(500)])[None].repeat(2, 1).cuda()
    info = token_info(torch.zeros_like(pos), pos, None)
    mask = visible(info, info, 256)[:, None]
    got = sdpa_dense(q, k, v, mask, 0.125)
    want = sdpa_query_chunks(q, k, v, mask, 0.125)
    assert (got - want).abs().max().item() <= 1e-5


def test_chunked_loss_in_bf16_on_cuda():
    import torch.nn.functional as F

    from gemma3_tune.model.loss import chunked_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(2)
    h = torch.randn(3000, 1152, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(262144, 1152, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    w.requires_grad_()
    t = torch.randint(0, 262144, (3000,), device="cuda", generator=g)
    got = chunked_cross_entropy(h, w, t)
    gh, gw = torch.autograd.grad(got, (h, w))
    h32, w32 = (x.detach().float().requires_grad_() for x in (h, w))
    want = F.cross_entropy(h32 @ w32.T, t)
    gh32, gw32 = torch.autograd.grad(want, (h32, w32))
    for a, b in ((got, want), (gh, gh32), (gw, gw32)):
        assert ((a.float() - b).abs().max() / b.abs().max()).item() <= 2e-2


@pytest.mark.gpu_long
def test_training_run_stays_within_the_graph_budget(tmp_path, tiny_dir):
    """A FlexAttention run over variable-length chats with evaluation, then `generate`: every
    compiled graph is one the budget counts (flex: buckets x layer types x grad modes; the
    compiled block-mask builder: buckets x layer types), and the limit is never reached (past
    it is an error, so finishing is the proof)."""
    from test_compile import _variable_chats
    from torch._dynamo.utils import counters

    from gemma3_tune.data.collate import bucket_lengths
    from gemma3_tune.model.generate import generate
    from gemma3_tune.train.recipe import load_recipe
    from gemma3_tune.train.trainer import build_trainer

    data = _variable_chats(tmp_path / "chats.jsonl", 120)
    r = write_recipe(
        tmp_path / "r.yaml", tiny_dir, data, tmp_path / "run", model__dtype="bfloat16",
        data__max_seq_len=512, data__packing=False, data__eval_split=0.1,
        training__max_steps=40, training__eval_steps=20, training__micro_batch_size=3,
        training__compile=False, training__save_steps=1000,
    )  # fmt: skip
    torch._dynamo.reset()
    counters.clear()
    trainer, _, _ = build_trainer(load_recipe(r))
    trainer.train()
    cells = len(bucket_lengths(512)) * len(set(preset("tiny").layer_types))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 3 * cells, (graphs, cells)
    model = trainer.model.eval()
    list(generate(model, torch.randint(4, 400, (1, 30), device="cuda"), max_new_tokens=10))
    assert counters["stats"]["unique_graphs"] == graphs
