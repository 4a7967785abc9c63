"""QLoRA: the export merges onto the very NF4 base the run trained against, and loading
quantizes tensor by tensor (the full-precision model never exists in memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from trainutil import chat_set, write_recipe

from gemma3_tune.export.hf_export import merged_model, probe_ids
from gemma3_tune.model import load_model


def _dequantized_bases(model) -> dict[str, torch.Tensor]:
    """name -> the dequantized NF4 weight each bitsandbytes Linear4bit of `model` computes with."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            key = name.removeprefix("base_model.model.").removesuffix(".base_layer")
            out[key] = bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_merges_onto_the_trained_base(dtype, tmp_path, tiny_dir):
    from gemma3_tune.train.qlora import dequantize_like_run
    from gemma3_tune.train.recipe import load_recipe
    from gemma3_tune.train.saving import save_final
    from gemma3_tune.train.trainer import build_trainer

    data = chat_set(tmp_path / "chat.jsonl", n=16)
    run = tmp_path / "run"
    r = write_recipe(
        tmp_path / "r.yaml", tiny_dir, data, run, method="qlora", model__dtype=dtype,
        training__max_steps=4, training__save_steps=100,
    )  # fmt: skip
    recipe = load_recipe(r)
    trainer, out, folder = build_trainer(recipe)
    trainer.train()
    save_final(trainer, recipe, out, folder)
    trained = _dequantized_bases(trainer.model)
    assert len(trained) == 7 * load_model(tiny_dir).config.num_hidden_layers
    assert {t.dtype for t in trained.values()} == {getattr(torch, dtype)}
    assert json.loads((run / "qlora.json").read_text())["compute_dtype"] == dtype

    export_base = load_model(tiny_dir, dtype=torch.float32)
    dequantize_like_run(export_base, run)
    state = export_base.state_dict()
    for name, w in trained.items():  # bitwise: the same codes, scales and rounding
        assert torch.equal(state[name + ".weight"], w.float()), name

    if dtype == "float32":  # merged logits equal the QLoRA model's (fp32, 1e-4)
        merged, *_ = merged_model(run)  # on the CPU
        ids, _ = probe_ids(merged)
        model = trainer.model.eval()  # where it trained (CUDA in tests/test_gpu.py)
        with torch.no_grad():
            want = model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()
            got = merged(ids).logits.float()
        assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's (pytest's, here) at fork.
PEAK = """
import sys, torch
from gemma3_tune.train.qlora import load_quantized
model = load_quantized(sys.argv[1], torch.float32, "cpu")
n = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print(n, hwm * 1024)
"""


@pytest.mark.slow
def test_quantized_load_peak_stays_below_the_fp32_model(tmp_path):
    """The 1B preset (random weights, stored in fp32: 3.7 GiB): a QLoRA load peaks below 3/4 of
    the model's fp32 size (measured 1.9 GB; loading it whole, then quantizing, as before: 3.4)."""
    from gemma3_tune.cli import main
    from gemma3_tune.model.config import preset

    folder = tmp_path / "1b"
    assert main(["init-model", "--preset", "1b", "--out", str(folder)]) == 0
    with torch.device("meta"):
        from gemma3_tune.model.gemma3 import Gemma3

        fp32_bytes = sum(p.numel() * 4 for p in Gemma3(preset("1b")).parameters())
    # A fixed mmap threshold makes glibc return every large freed block at once: without it,
    # its dynamic threshold keeps freed 32 MB layer temporaries in the heap at random (peaks of
    # 2-5 GB from run to run), which is the allocator's retention, not memory the load holds.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, "-c", PEAK, str(folder)], capture_output=True, text=True, timeout=900,
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    n, peak = map(int, done.stdout.split())
    assert n == 7 * preset("1b").num_hidden_layers
    assert peak < 0.75 * fp32_bytes, (peak / 2**30, fp32_bytes / 2**30)


def test_only_decoder_linears_are_4bit_on_a_vision_model(tmp_path, tiny_vision_dir):
    """A tiny-vision QLoRA run (fp32, 2 steps, images): the 7 linears of every decoder layer are
    NF4 and nothing else is; every SigLIP and projector weight stays in the compute dtype. The
    export's rebuilt base leaves the tower and projector bitwise as stored, and QAT fake-quantizes
    the decoder only. (SigLIP's q/k/v_proj were NF4 before: on AVX512-BF16 CPUs the 32-wide
    tower then failed in bitsandbytes' CPU packing before the first step.)"""
    import bitsandbytes as bnb
    from trainutil import colour_set

    from gemma3_tune.train import qat
    from gemma3_tune.train.qlora import dequantize_like_run
    from gemma3_tune.train.recipe import QatSection, load_recipe
    from gemma3_tune.train.trainer import build_trainer

    data = colour_set(tmp_path / "img", 8, seed=3)
    run = tmp_path / "run"
    r = write_recipe(
        tmp_path / "r.yaml", tiny_vision_dir, data, run, method="qlora",
        training__max_steps=2, training__save_steps=100,
    )  # fmt: skip
    trainer, *_ = build_trainer(load_recipe(r))
    trainer.train()
    model = trainer.model.get_base_model()
    layers = model.config.num_hidden_layers
    nf4 = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(nf4) == 7 * layers
    assert all(n.startswith("model.language_model.layers.") for n in nf4), nf4
    for part in (model.vision_tower, model.projector):
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in part.modules())
        assert {p.dtype for p in part.parameters()} == {torch.float32}

    stored = load_model(tiny_vision_dir, dtype=torch.float32).state_dict()
    export_base = load_model(tiny_vision_dir, dtype=torch.float32)
    dequantize_like_run(export_base, run)
    changed = {k for k, v in export_base.state_dict().items() if not torch.equal(v, stored[k])}
    assert len(changed) == 7 * layers
    assert all(k.startswith("model.language_model.layers.") for k in changed), sorted(changed)

    plain = load_model(tiny_vision_dir, dtype=torch.float32)
    qat.apply(plain, QatSection(format="q8_0"), trains_embedding=False)
    fake = [n for n, m in plain.named_modules() if isinstance(m, qat.QATLinear)]
    assert len(fake) == 7 * layers
    assert all(n.startswith("model.language_model.layers.") for n in fake), fake


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_computes_as_it_trains_in_eval(dtype):
    """In eval mode under no_grad (reference log-probs, eval, the export check) an NF4 linear
    gives, bitwise, dequantize-then-matmul in the compute dtype, as in training. On CPUs with
    AVX512-BF16, bitsandbytes would repack it for a bf16 kernel instead (bf16 activations and
    scales whatever the compute dtype: 0.045 off in this file's fp32 export check)."""
    import bitsandbytes.functional as bnbf

    from gemma3_tune.train.qlora import linear4bit

    w = torch.randn(96, 128)
    q = linear4bit(w, dtype, "cpu").eval()
    x = torch.randn(3, 5, 128, dtype=dtype)
    want = torch.nn.functional.linear(x, bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state))
    with torch.no_grad():
        got = q(x)
    assert not getattr(q.weight.quant_state, "packing_format_for_cpu", False)
    assert got.dtype == dtype and torch.equal(got, want)
