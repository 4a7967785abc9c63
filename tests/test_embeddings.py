"""train_embeddings: the tied embedding (input embedding and LM head, one tensor) trains at its own
lr under LoRA, QLoRA and full; the adapter carries it, a resumed run ends where an unbroken one
does, and the merged export computes the trained model's logits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from trainutil import chat_set, write_recipe

from gemma3_tune.cli import main
from gemma3_tune.model import load_model
from gemma3_tune.train.adapters import (
    HF_HEAD,
    apply_method,
    group_lrs,
    parameter_table,
    unwrap,
)
from gemma3_tune.train.recipe import load_recipe

LR = 5e-3
EMBED_KEY = "base_model.model.model.embed_tokens.weight"  # in adapter_model.safetensors


def _recipe(tmp_path, model_dir, name: str = "run", n: int = 16, **over):
    data = chat_set(tmp_path / "chat.jsonl", n=n)
    over = {"train_embeddings": True, **over}
    return write_recipe(tmp_path / f"{name}.yaml", model_dir, data, tmp_path / name, **over)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def test_lora_trains_peft_copy_read_by_input_and_head(tmp_path, tiny_dir):
    """peft's modules_to_save copy is the one tensor both the input embedding and the LM head
    read: a token absent from the input gets a gradient (through the head only), the frozen
    original is not read at all, and the copy alone moves the logits."""
    model = apply_method(load_model(tiny_dir), load_recipe(_recipe(tmp_path, tiny_dir)))
    text = unwrap(model).text_model
    wrapper = text.embed_tokens
    copy, original = wrapper.modules_to_save["default"].weight, wrapper.original_module.weight
    assert text.embedding_weight() is copy
    assert copy.requires_grad and not original.requires_grad
    assert copy.data_ptr() != original.data_ptr()

    ids = torch.randint(10, 200, (1, 12))
    absent = 300  # never in ids: its row reaches the loss through the head only
    model(input_ids=ids, labels=ids).loss.backward()
    assert copy.grad[absent].abs().sum() > 0 and copy.grad[ids[0, 0]].abs().sum() > 0
    assert original.grad is None

    before = _logits(model, ids)
    with torch.no_grad():
        original.add_(1.0)  # the stand-by original: not read
    assert torch.equal(_logits(model, ids), before)
    with torch.no_grad():
        copy[absent] += 1.0  # the head's column for `absent`, and nothing else
    diff = (_logits(model, ids) - before).abs()
    assert diff[..., absent].max() > 0.1 and diff[..., :absent].max() == 0


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_tower_stays_frozen_and_the_table_shows_the_embedding(method, tmp_path, tiny_vision_dir):
    model = load_model(tiny_vision_dir)
    v, d = model.config.vocab_size, model.config.hidden_size
    recipe = load_recipe(_recipe(tmp_path, tiny_vision_dir, method=method))
    model = apply_method(model, recipe)
    tower = [n for n, p in model.named_parameters() if "vision_tower" in n]
    assert tower and not any(p.requires_grad for n, p in model.named_parameters() if n in tower)
    row = next(x for x in parameter_table(model).splitlines() if x.startswith("embeddings"))
    assert row.split()[-2:] == [f"{v * d:,}", "0"], (
        row
    )  # trainable, frozen (peft's stand-by skipped)
    emb = unwrap(model).text_model.embed_tokens
    trained = emb if method == "full" else emb.modules_to_save["default"]
    assert type(trained) is torch.nn.Embedding and trained.weight.requires_grad  # never 4-bit


def test_param_groups_by_name_rule():
    from gemma3_tune.train.loop import param_groups

    ps = {n: torch.nn.Parameter(torch.zeros(1)) for n in ("a.q_proj.w", "a.norm.weight",
          "x.embed_tokens.modules_to_save.default.weight", "multi_modal_projector.w")}  # fmt: skip
    lrs = {"multi_modal_projector": 1e-5, "embed_tokens": 1e-4}
    decay = {"a.q_proj.w", "x.embed_tokens.modules_to_save.default.weight"}
    groups = param_groups(list(ps.items()), lrs, decay, 0.1)
    got = [([n for n, p in ps.items() if any(p is q for q in g["params"])], g) for g in groups]
    assert [(names, g.get("lr"), g["weight_decay"]) for names, g in got] == [
        (["a.q_proj.w"], None, 0.1),  # the default lr first: the Trainer logs it
        (["a.norm.weight"], None, 0.0),
        (["multi_modal_projector.w"], 1e-5, 0.0),
        (["x.embed_tokens.modules_to_save.default.weight"], 1e-4, 0.1),
    ]


def test_lora_targets_point_to_train_embeddings():
    from gemma3_tune.errors import UserError
    from gemma3_tune.train.adapters import target_regex

    for name in ("embed_tokens", "lm_head"):
        with pytest.raises(UserError, match="train it with train_embeddings: true"):
            target_regex(["q_proj", name])


def test_embedding_lr_defaults_to_a_tenth_of_lr(tmp_path, tiny_dir):
    r = _recipe(tmp_path, tiny_dir)
    assert group_lrs(load_recipe(r)) == {"embed_tokens": LR / 10}
    assert group_lrs(load_recipe(r, ["embedding_lr=1e-4"])) == {"embed_tokens": 1e-4}
    assert group_lrs(load_recipe(r, ["method=full", "train_embeddings=null"])) == {}


@pytest.mark.parametrize(
    "setting, want", [(None, LR), (True, LR / 4), (False, 0.0)], ids=["default", "true", "false"]
)
def test_full_trains_the_embedding_at_its_lr(setting, want, tmp_path, tiny_dir):
    """One AdamW step moves each weight with a gradient by exactly its group's lr (m / sqrt(v) is
    the gradient's sign at step 1): full's default trains the embedding at training.lr, `true`
    at embedding_lr, `false` not at all; the decoder at training.lr throughout."""
    r = _recipe(
        tmp_path, tiny_dir, method="full", train_embeddings=setting, n=4,
        training__max_steps=1, training__lr_scheduler="constant", training__max_grad_norm=0.0,
        **({"embedding_lr": LR / 4} if setting else {}),
    )  # fmt: skip
    assert main(["train", str(r)]) == 0
    before = load_model(tiny_dir).state_dict()
    after = load_model(tmp_path / "run" / "model").state_dict()

    def moved(key):
        return (after[key] - before[key]).abs().max().item()

    assert moved("model.embed_tokens.weight") == pytest.approx(want, rel=1e-3)
    assert moved("model.layers.0.mlp.down_proj.weight") == pytest.approx(LR, rel=1e-3)


@pytest.mark.slow  # a training run, exports and a resume: over 4 s
def test_lora_saves_resumes_and_merges(tmp_path, tiny_dir, capsys):
    """LoRA + embedding, 4 steps, checkpoints at 2 and 4: the adapter holds the trained copy; a
    run resumed from checkpoint-2 ends with the same adapter; the merged export (fp32) computes
    the trained model's logits, and so do transformers + peft with the adapter (lm_head tied to
    the trained copy); the GGUF export stores the trained embedding."""
    import peft
    import transformers
    from gguf import GGUFReader

    from gemma3_tune.train.saving import save_final
    from gemma3_tune.train.trainer import build_trainer

    over = dict(training__max_steps=4, training__save_steps=2, data__packing=False)
    r = _recipe(tmp_path, tiny_dir, **over)
    recipe = load_recipe(r)
    trainer, out, folder = build_trainer(recipe)
    trainer.train()
    save_final(trainer, recipe, out, folder)
    text = unwrap(trainer.model).text_model
    (i,) = [k for k, g in enumerate(trainer.optimizer.param_groups)
            if any(p is text.embed_tokens.weight for p in g["params"])]  # fmt: skip
    assert trainer.lr_scheduler.base_lrs[i] == LR / 10

    run = tmp_path / "run"
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert torch.equal(saved[EMBED_KEY], text.embed_tokens.weight.detach())
    assert torch.equal(saved[HF_HEAD], saved[EMBED_KEY])  # transformers' tied lm_head reads it
    base_emb = load_model(tiny_dir).state_dict()["model.embed_tokens.weight"]
    assert (saved[EMBED_KEY] - base_emb).abs().max() > 1e-3  # it trained
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["ensure_weight_tying"]
    assert "plus the tied embedding (LM head)" in (run / "README.md").read_text()

    ids = torch.randint(4, 500, (1, 24), generator=torch.Generator().manual_seed(3))
    want = _logits(trainer.model, ids)
    assert main(["export", str(run), "--out", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    merged = load_model(tmp_path / "merged", dtype=torch.float32)
    assert (_logits(merged, ids) - want).abs().max().item() <= 1e-5
    assert main(["export", str(run), "--adapter-only", "--out", str(tmp_path / "ad")]) == 0
    cls = transformers.Gemma3ForCausalLM
    hf = peft.PeftModel.from_pretrained(cls.from_pretrained(tiny_dir), tmp_path / "ad").eval()
    with torch.no_grad():
        got = hf(input_ids=ids, use_cache=False).logits
    assert (got - want).abs().max().item() <= 1e-4
    gguf = tmp_path / "m.gguf"
    assert (
        main(["export", str(run), "--format", "gguf", "--gguf-dtype", "f32", "--out", str(gguf)])
        == 0
    )
    stored = {t.name: t for t in GGUFReader(str(gguf)).tensors}["token_embd.weight"]
    assert torch.equal(torch.from_numpy(stored.data.copy()).view_as(base_emb), saved[EMBED_KEY])

    vllm = ["export", str(run), "--adapter-only", "--for", "vllm", "--out", str(tmp_path / "v")]
    capsys.readouterr()
    assert main(vllm) == 2
    assert "train_embeddings: false" in capsys.readouterr().err

    # resume from checkpoint-2: the same adapter as the unbroken run
    shutil.rmtree(run / "checkpoint-4")
    shutil.rmtree(run / "adapter")
    capsys.readouterr()
    assert main(["train", str(r), "training.resume=true"]) == 0
    assert "resuming from checkpoint-2" in capsys.readouterr().err
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    assert got.keys() == saved.keys()
    assert max((got[k] - saved[k]).abs().max().item() for k in saved) <= 1e-5


@pytest.mark.slow
def test_qlora_embedding_trains_unquantized_and_merges(tmp_path, tiny_dir):
    from gemma3_tune.export.hf_export import merged_model
    from gemma3_tune.train.saving import save_final
    from gemma3_tune.train.trainer import build_trainer

    r = _recipe(tmp_path, tiny_dir, method="qlora", training__max_steps=2, training__save_steps=100)
    recipe = load_recipe(r)
    trainer, out, folder = build_trainer(recipe)
    trainer.train()
    save_final(trainer, recipe, out, folder)
    emb = unwrap(trainer.model).text_model.embed_tokens
    assert type(emb.modules_to_save["default"]).__name__ == "Embedding"
    assert emb.weight.dtype == torch.float32 and emb.weight.requires_grad
    saved = load_file(out / "adapter" / "adapter_model.safetensors")[EMBED_KEY]
    model, *_ = merged_model(out)
    assert torch.equal(model.text_model.embed_tokens.weight, saved)
    ids = torch.randint(4, 500, (1, 24), generator=torch.Generator().manual_seed(3))
    want = _logits(trainer.model, ids)
    assert (_logits(model, ids) - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max())
