"""Training end to end on tiny models: every method learns, the tower never changes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from trainutil import chat_set, colour_set, losses, write_recipe

from gemma3_tune.cli import main
from gemma3_tune.model import load_model

METHODS = {
    "lora": {},
    "dora": {"lora__use_dora": True},
    "qlora": {"method": "qlora"},
    "full": {"method": "full", "training__lr": 2e-3},
    "projector_only": {"method": "none", "train_projector": True, "training__lr": 2e-2},
}


@pytest.mark.parametrize("method", list(METHODS))
def test_loss_falls(method, tmp_path, tiny_vision_dir):
    if method == "projector_only":
        data = colour_set(tmp_path / "img", 16, seed=1)
    else:
        data = chat_set(tmp_path / "chat.jsonl")
    over = METHODS[method]
    r = write_recipe(tmp_path / "r.yaml", tiny_vision_dir, data, tmp_path / "run", **over)
    before = {
        k: v.clone()
        for k, v in load_model(tiny_vision_dir).state_dict().items()
        if "vision_tower" in k
    }
    assert main(["train", str(r)]) == 0
    ls = losses(tmp_path / "run")
    assert len(ls) == 20
    first, last = sum(ls[:3]) / 3, sum(ls[-3:]) / 3
    assert last < 0.8 * first, (method, ls)
    if method == "full":
        after = load_model(tmp_path / "run" / "model").state_dict()
    elif method == "projector_only":
        saved = load_file(tmp_path / "run" / "adapter" / "projector.safetensors")
        assert set(saved) == {
            "model.multi_modal_projector.mm_input_projection_weight",
            "model.multi_modal_projector.mm_soft_emb_norm.weight",
        }
        return
    else:
        cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["use_dora"] == (method == "dora")
        return
    for k, v in before.items():  # the SigLIP tower is bit-identical after full SFT
        assert torch.equal(after[k], v), k


def test_tower_gets_no_gradient_and_stays_identical(tmp_path, tiny_vision_dir):
    """LoRA + projector on images: the tower has requires_grad False, .grad None, same bits."""
    from gemma3_tune.train.adapters import apply_method, unwrap
    from gemma3_tune.train.recipe import load_recipe

    data = colour_set(tmp_path / "img", 4, seed=2)
    r = write_recipe(
        tmp_path / "r.yaml", tiny_vision_dir, data, tmp_path / "run", train_projector=True
    )
    recipe = load_recipe(r)
    model = apply_method(load_model(tiny_vision_dir), recipe)
    tower = unwrap(model).vision_tower
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    n = unwrap(model).config.mm_tokens_per_image
    ids = torch.randint(5, 400, (1, n + 8))
    ids[0, 2 : 2 + n] = unwrap(model).config.image_token_id
    out = model(input_ids=ids, labels=ids, pixel_values=torch.randn(1, 3, 64, 64))
    out.loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in tower.parameters())
    proj_grads = [
        p.grad
        for n_, p in model.named_parameters()
        if "multi_modal_projector" in n_ and p.requires_grad
    ]
    assert proj_grads and all(g is not None and g.abs().sum() > 0 for g in proj_grads)
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())
    assert not tower.training  # always eval mode
    model.train()
    assert not tower.training


def test_run_outputs_and_offline_wandb(tmp_path, tiny_dir, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    data = chat_set(tmp_path / "chat.jsonl", n=30)
    r = write_recipe(
        tmp_path / "r.yaml", tiny_dir, data, tmp_path / "run",
        training__max_steps=6, training__save_steps=3, training__eval_steps=3,
        training__warmup_steps=2, data__eval_split=0.2,
        wandb={"project": "tiny", "mode": "offline"},
    )  # fmt: skip
    capsys.readouterr()
    assert main(["train", str(r), "training.lr=0.004"]) == 0
    console = capsys.readouterr()
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [x for x in rows if "loss" in x]
    eval_rows = [x for x in rows if "eval_loss" in x]
    assert len(train_rows) == 6 and [x["step"] for x in eval_rows] == [3, 6]
    # warmup from lr / warmup_steps (not 0), then cosine to 0 over the 4 remaining steps
    want = [0.5, 1, 1, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]
    assert [x["lr"] for x in train_rows] == pytest.approx([0.004 * f for f in want], rel=1e-9)

    # The console: one compact line per logged step and eval, no dicts, no DeepSpeed warning
    # (no TTY here, so no bar); the numbers are metrics.jsonl's
    lines = [x for x in console.err.splitlines() if x.startswith(("step ", "eval "))]
    assert len(lines) == 8, console.err
    for x, line in zip(train_rows, [x for x in lines if x.startswith("step")], strict=True):
        assert line.startswith(f"step {x['step']}/6  loss {x['loss']:.4f}  lr {x['lr']:.2e}  ")
    assert lines[3] == (
        f"eval 3/6  loss {eval_rows[0]['eval_loss']:.4f}"
        f"  perplexity {eval_rows[0]['eval_perplexity']:.2f}"
    )
    for noise in ("{'loss'", "learning_rate", "Setting accelerator", "kernels-community"):
        assert noise not in console.err + console.out, noise

    # Our model card, in the run and in adapter/ (which is what people share); no pickles there
    report = json.loads((run / "data_report.json").read_text())
    for card in (run / "README.md", run / "adapter" / "README.md"):
        text = card.read_text()
        assert "None" not in text and "More Information Needed" not in text
        assert f"base_model: {tiny_dir}" in text and "| status | complete: 6 steps |" in text
        assert "LoRA adapter (r 8, alpha 16, dropout 0, targets all-linear)" in text
        assert f"| samples | {report['samples']:,} train, {report['eval_samples']:,} eval;" in text
        last = train_rows[-1]
        assert f"-> {last['loss']:.4f} at step 6 ({last['tokens']:,} tokens)" in text
        assert f"| eval loss | {eval_rows[-1]['eval_loss']:.4f}" in text
        assert f"gemma3-tune export {run} --out merged" in text and "lr: 0.004" in text
    assert not (run / "adapter" / "training_args.bin").exists()
    for x in train_rows:
        assert set(x) >= {
            "step",
            "loss",
            "lr",
            "grad_norm",
            "tokens",
            "tokens_per_second",
            "step_seconds",
            "peak_memory_gb",
        }
        assert x["tokens"] > 0 and x["tokens_per_second"] > 0
    assert (
        abs(eval_rows[0]["eval_perplexity"] - torch.tensor(eval_rows[0]["eval_loss"]).exp().item())
        < 1e-3
    )
    from PIL import Image

    assert Image.open(run / "loss.png").size[0] > 100
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["training"]["lr"] == 0.004 and resolved["wandb"]["mode"] == "offline"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline and any(offline[0].glob("*.wandb"))


def test_first_step_learns(tmp_path, tiny_dir):
    """warmup_steps: 1 and one step: the LoRA B matrices (zero at init) move, and the step ran
    at the full lr (HF's warmup would run it at lr 0 and leave them zero)."""
    from safetensors.torch import load_file

    data = chat_set(tmp_path / "chat.jsonl", n=8)
    r = write_recipe(
        tmp_path / "r.yaml", tiny_dir, data, tmp_path / "run",
        training__max_steps=1, training__warmup_steps=1, training__lr_scheduler="constant",
    )  # fmt: skip
    assert main(["train", str(r)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] == 5e-3
    weights = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and all(v.abs().max() > 0 for v in b)


def test_lr_factor_by_hand():
    from gemma3_tune.train.schedule import lr_factor

    assert [lr_factor(s, 3, 7, "linear") for s in range(7)] == pytest.approx(
        [1 / 3, 2 / 3, 1, 1, 0.75, 0.5, 0.25]
    )
    assert [lr_factor(s, 2, 5, "constant") for s in range(5)] == [0.5, 1, 1, 1, 1]
    assert [lr_factor(s, 0, 3, "cosine") for s in range(3)] == pytest.approx([1, 0.75, 0.25])


def test_refuses_non_empty_output_dir_and_bad_data_before_loading(tmp_path, tiny_dir, capsys):
    data = chat_set(tmp_path / "chat.jsonl", n=4)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("keep me")
    r = write_recipe(tmp_path / "r.yaml", tiny_dir, data, tmp_path / "run")
    assert main(["train", str(r)]) == 2
    assert "training.output_dir" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"messages": [}\n')
    r = write_recipe(
        tmp_path / "r2.yaml", tmp_path / "no-model", tmp_path / "bad.jsonl", tmp_path / "run2"
    )
    assert main(["train", str(r)]) == 2
    assert "model.path" in capsys.readouterr().err


def test_vision_adapter_learns_colours(tmp_path, tiny_vision_dir):
    """LoRA + trained projector on solid-colour pictures: held-out greedy answers >= 90% right."""
    from gemma3_tune.data.tokenizer import Tokenizer
    from gemma3_tune.export.inference import load_with_adapter, reply, resolve_run

    train = colour_set(tmp_path / "img", 96, seed=3, with_text_only=8)
    held = colour_set(tmp_path / "img", 30, seed=4)
    r = write_recipe(
        tmp_path / "r.yaml", tiny_vision_dir, train, tmp_path / "run", train_projector=True,
        training__max_steps=60, training__micro_batch_size=4, training__lr=1e-2, training__save_steps=1000,
    )  # fmt: skip
    assert main(["train", str(r)]) == 0
    base, adapter = resolve_run(tmp_path / "run")
    model = load_with_adapter(base, adapter).eval()
    tok = Tokenizer(base)
    right = 0
    rows = [json.loads(x) for x in held.read_text().splitlines()]
    for row in rows:
        image = tmp_path / "img" / row["messages"][0]["content"][0]["image"]
        answer = tok.decode(
            list(reply(model, tok, "What colour is this?", [str(image)], max_new_tokens=4))
        )
        right += answer.strip() == row["messages"][1]["content"]
    assert right / len(rows) >= 0.9, right


def test_the_trainers_own_checkpointing_is_off_under_either_transformers(tmp_path):
    """TRL's SFTConfig turns the Trainer's activation checkpointing on by default (every layer
    recomputed again under ours, ~30% slower). transformers 5.2x calls the switch
    `activation_checkpointing`, 5.17 (the GPU machine's) only `gradient_checkpointing` and
    refuses the new name: the trainer passes the name the installed one has."""
    import dataclasses

    from trl import SFTConfig

    from gemma3_tune.train.args import checkpointing_off

    @dataclasses.dataclass
    class Transformers517:  # the fields of 5.17's TrainingArguments, as far as this goes
        gradient_checkpointing: bool = False

    assert checkpointing_off(Transformers517) == {"gradient_checkpointing": False}
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, **checkpointing_off(SFTConfig))
    assert args.gradient_checkpointing is False
