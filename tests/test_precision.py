"""train/precision.py's rule: trainable weights have fp32 masters and compute runs in
model.dtype, for every method and launcher (bf16 runs on this CPU: the tiny models are small
enough for its slow bf16 matmuls)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainutil import colour_set, free_port, write_recipe

from gemma3_tune.cli import main
from gemma3_tune.model import load_model

PROBE = Path(__file__).parent / "precision_probe.py"
PROJ = "multi_modal_projector.mm_input_projection_weight"
DOWN = "model.language_model.layers.0.mlp.down_proj.weight"

# method -> (recipe overrides, what to compare)
METHODS = {
    "projector_only": ({"method": "none", "train_projector": True}, PROJ),
    "lora_projector": ({"train_projector": True}, PROJ),  # peft modules_to_save copy
    "full": ({"method": "full"}, DOWN),
    "qlora": ({"method": "qlora"}, "layers.0.self_attn.q_proj.lora_B.weight"),
}


def _trained(run: Path, what: str) -> torch.Tensor:
    """The weight `what` as the run saved it."""
    if (run / "model").is_dir():
        return load_model(run / "model").state_dict()[what]
    adapter = run / "adapter"
    if (adapter / "projector.safetensors").is_file():
        return load_file(adapter / "projector.safetensors")["model." + what]
    weights = load_file(adapter / "adapter_model.safetensors")
    return next(v for k, v in weights.items() if k.endswith(what))


@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_updates_equal_fp32_masters(method, tmp_path, tiny_vision_dir):
    """10 steps at lr 1e-5 (vision-adapter-4b.yaml's): in bf16 with fp32 masters, the update
    equals the fp32 run's within bf16's error (relative L2 <= 0.1) and moves >= 99% of the
    entries. Pure bf16 weights moved 2.3% of the projector (the defect this fixes). QLoRA's
    adapter is the one TRL casts to bf16 for 4-bit models: it must come back fp32."""
    over, what = METHODS[method]
    data = colour_set(tmp_path / "img", 16, seed=1)
    state = load_model(tiny_vision_dir).state_dict()
    key = "model." + what if what == PROJ else what
    base = state[key].float() if key in state else torch.zeros(())  # LoRA B starts at 0
    update = {}
    for dtype in ("float32", "bfloat16"):
        run = tmp_path / dtype
        r = write_recipe(
            tmp_path / f"{dtype}.yaml", tiny_vision_dir, data, run, model__dtype=dtype,
            training__lr=1e-5, training__max_steps=10, training__warmup_steps=0,
            training__save_steps=100, **over,
        )  # fmt: skip
        assert main(["train", str(r)]) == 0
        saved = _trained(run, what)
        assert saved.dtype == torch.float32, (dtype, saved.dtype)  # the masters are saved
        start = base if dtype == "float32" else base.to(torch.bfloat16).float()
        update[dtype] = saved - start
    got, want = update["bfloat16"], update["float32"]
    moved = (got != 0).float().mean().item()
    assert moved >= 0.99, moved
    rel = ((got - want).norm() / want.norm()).item()
    # QLoRA's bf16 run also dequantizes its NF4 base into bf16 (the fp32 run into fp32), so its
    # gradients, not only its updates, differ by more (measured 0.30)
    assert rel <= (0.4 if method == "qlora" else 0.1), rel


def _launch(launcher: str, recipe: Path, prefix: Path) -> None:
    cmd = [sys.executable, str(PROBE), str(recipe), str(prefix)]
    if launcher != "plain":
        run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd = [*run, "--master_port", str(free_port()), *cmd[1:]]
    if launcher.startswith("zero"):
        cmd.append(f"deepspeed={launcher}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["plain", "ddp", "zero2", "zero3"])
def test_one_precision_rule_per_launcher(launcher, tmp_path, tiny_vision_dir):
    """bf16 LoRA + a trained projector: the optimizer updates fp32 weights with fp32 moments
    on every launcher, ZeRO accumulates gradients in fp32, and the saved adapter holds fp32
    masters. The module's own copies are
    fp32 without DeepSpeed and bf16 under it (DeepSpeed's bf16 mode: compute copies, with the
    fp32 masters in its optimizer)."""
    data = colour_set(tmp_path / "img", 8, seed=2)
    run = tmp_path / "run"
    r = write_recipe(
        tmp_path / "r.yaml", tiny_vision_dir, data, run, model__dtype="bfloat16",
        train_projector=True, training__max_steps=2, training__micro_batch_size=1,
        training__save_steps=100,
    )  # fmt: skip
    _launch(launcher, r, tmp_path / "probe")
    ranks = 1 if launcher == "plain" else 2
    for rank in range(ranks):
        seen = json.loads((tmp_path / f"probe.{rank}.json").read_text())
        assert seen["masters"] and set(seen["masters"]) == {"torch.float32"}, seen["masters"]
        assert seen["state"] and set(seen["state"]) == {"torch.float32"}, seen["state"]
        copies = "torch.bfloat16" if launcher.startswith("zero") else "torch.float32"
        assert set(seen["params"].values()) == {copies}, seen["params"]
        if launcher.startswith("zero"):  # micro-batch gradients summed in fp32, not bf16
            assert seen["grad_accum"] == "torch.float32", seen["grad_accum"]
        assert any("mm_input_projection_weight" in n for n in seen["params"])
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float32}
    assert any("mm_input_projection_weight" in k for k in saved)


@pytest.mark.parametrize("flags,want", [("avx512_bf16", "bfloat16"), ("avx2", "float32")])
def test_dtype_auto_is_recorded_as_what_it_resolved_to(
    flags, want, tmp_path, tiny_dir, monkeypatch
):
    """A run with `model.dtype: auto` trains in, and writes into its recipe.yaml, the dtype auto
    meant on that CPU (the probe's two answers, from CPU flags), so eval, export and a resume on
    another machine read the dtype it trained in."""
    import yaml
    from trainutil import chat_set

    from gemma3_tune.model import dtypes

    info = tmp_path / "cpuinfo"
    info.write_text(f"flags\t\t: fpu avx512f {flags}\n")
    monkeypatch.setattr(dtypes, "CPUINFO", info)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    r = write_recipe(
        tmp_path / "r.yaml", tiny_dir, chat_set(tmp_path / "c.jsonl", 8), run,
        model__dtype="auto", training__max_steps=1, training__save_steps=100,
    )  # fmt: skip
    assert main(["train", str(r)]) == 0
    assert yaml.safe_load((run / "recipe.yaml").read_text())["model"]["dtype"] == want
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"] > 0


def test_float16_keeps_the_residual_stream_in_fp32(tiny_dir):
    """Gemma 3's residual stream outgrows fp16 (the real 270M reaches 104,061 on the quickstart
    chats; max 65,504). Here the post-MLP norms are scaled until the tiny model's does too: in
    float16 the forward stays finite and within fp16's error of float32's (the residual adds
    and norms in fp32, the matmuls in fp16), and so do the loss and every gradient."""
    ref = load_model(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        for layer in ref.text_model.layers:
            layer.post_feedforward_layernorm.weight.fill_(3e4)
    half = load_model(tiny_dir, dtype=torch.float16)
    half.load_state_dict({k: v.half() for k, v in ref.state_dict().items()})
    seen = []
    ref.text_model.norm.register_forward_hook(lambda m, i, o: seen.append(i[0].abs().max()))
    ids = torch.randint(
        3, ref.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0)
    )
    want, got = ref(ids).logits, half(ids).logits
    assert seen[0] > 65504  # the fp32 residual stream is beyond fp16's range
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert (got.float() - want).abs().max() <= 2e-2 * want.abs().max()
    loss32, loss16 = ref(ids, labels=ids).loss, half(ids, labels=ids).loss
    assert abs(loss16.item() - loss32.item()) <= 1e-2 * loss32.item()
    loss16.backward()
    assert all(torch.isfinite(p.grad).all() for p in half.parameters() if p.grad is not None)


def _objective(name: str, tmp_path: Path, tiny_dir: Path, tiny_vision_dir: Path):
    """(model, data, recipe overrides) of a short run of each objective."""
    from test_preference_train import pair_set
    from trainutil import chat_set

    cache = {"data__cache_dir": str(tmp_path / "cache")}
    if name == "distill":  # the teacher's targets cached in the run's dtype
        return tiny_dir, chat_set(tmp_path / "c.jsonl"), {"distill": {"teacher": str(tiny_dir)}}
    if name == "dpo":  # reference log-probs computed in it
        return tiny_dir, pair_set(tmp_path / "p.jsonl"), {"objective": "dpo", **cache}
    if name == "qat":
        return tiny_dir, chat_set(tmp_path / "c.jsonl"), {"qat": {"format": "q4_0"}}
    data = colour_set(tmp_path / "img", 8, seed=4)  # feature_cache: SigLIP's output cached
    return tiny_vision_dir, data, {"data__feature_cache": str(tmp_path / "features")}


@pytest.mark.parametrize("name", ["distill", "dpo", "qat", "feature_cache"])
def test_objectives_train_in_bf16_as_in_fp32(name, tmp_path, tiny_dir, tiny_vision_dir):
    """What `dtype: auto` now picks on native-bf16 CPUs: each objective's run in bf16 gives the
    fp32 run's first loss (before any update: the forward's numerics alone) within bf16's
    error, and finite losses after."""
    model, data, over = _objective(name, tmp_path, tiny_dir, tiny_vision_dir)
    first = {}
    for dtype in ("float32", "bfloat16"):
        run = tmp_path / dtype
        r = write_recipe(
            tmp_path / f"{dtype}.yaml", model, data, run, model__dtype=dtype,
            training__max_steps=3, training__logging_steps=1, training__save_steps=100, **over,
        )  # fmt: skip
        assert main(["train", str(r)]) == 0
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [x["loss"] for x in rows if "loss" in x and "step" in x]
        assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
        first[dtype] = losses[0]
    assert first["bfloat16"] == pytest.approx(first["float32"], rel=0.02), first
