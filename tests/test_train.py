"""Training end to end on tiny models: every method learns, the tower never changes."""

from __future__ import annotations

import json

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


def test_run_outputs_and_offline_wandb(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    data = chat_set(tmp_path / "chat.jsonl", n=30)
    r = write_recipe(
        tmp_path / "r.yaml", tiny_dir, data, tmp_path / "run",
        training__max_steps=6, training__save_steps=3, training__eval_steps=3,
        data__eval_split=0.2, wandb={"project": "tiny", "mode": "offline"},
    )  # fmt: skip
    assert main(["train", str(r), "training.lr=0.004"]) == 0
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [x for x in rows if "loss" in x]
    eval_rows = [x for x in rows if "eval_loss" in x]
    assert len(train_rows) == 6 and [x["step"] for x in eval_rows] == [3, 6]
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
