"""What a run folder holds: a parameter table that counts each parameter once, a model card
whose paths are all as the recipe wrote them, the same tokenizer files in every checkpoint-N/
as in adapter/, and adapters (final, checkpoint, exported) that peft's AutoPeftModel loads
onto transformers' Gemma 3 with our model's logits."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from trainutil import chat_set, colour_set, write_recipe

from gemma3_tune.cli import main
from gemma3_tune.data.tokenizer import TOKENIZER_FILES
from gemma3_tune.export.inference import load_with_adapter
from gemma3_tune.model import load_model


def _train_in(folder: Path, recipe: Path) -> None:
    """`gemma3-tune train` run from `folder`, where the recipe's relative paths start."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert main(["train", str(recipe.relative_to(folder))]) == 0
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_dir) -> Path:
    """A 2-step LoRA run (checkpoint-1, checkpoint-2, adapter/), every path relative."""
    d = tmp_path_factory.mktemp("outputs")
    chat_set(d / "chat.jsonl", n=8)
    model = os.path.relpath(tiny_dir, d)
    r = write_recipe(
        d / "r.yaml", Path(model), Path("chat.jsonl"), Path("run"),
        training__max_steps=2, training__save_steps=1,
    )  # fmt: skip
    _train_in(d, r)
    return d


def test_parameter_table_counts_projector_once(tmp_path, tiny_vision_dir):
    """LoRA r 8 + train_projector on tiny-vision: peft keeps the projector's original beside
    its trainable copy; the table counts the copy only. Hand count from config.json."""
    from gemma3_tune.train.adapters import apply_method, parameter_table
    from gemma3_tune.train.recipe import load_recipe

    cfg = json.loads((tiny_vision_dir / "config.json").read_text())
    t, v = cfg["text_config"], cfg["vision_config"]
    h, ff, hd = t["hidden_size"], t["intermediate_size"], t["head_dim"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    r = 8
    # q, k, v, o, gate, up, down: r * (in + out) each
    lora_per_layer = r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + ff) + (ff + h))
    lora = lora_per_layer * t["num_hidden_layers"]
    projector = v["hidden_size"] * h + v["hidden_size"]  # projection + soft-embedding norm
    with safe_open(str(tiny_vision_dir / "model.safetensors"), "pt") as f:
        own = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118

    data = tmp_path / "x.jsonl"
    r = write_recipe(
        tmp_path / "r.yaml", tiny_vision_dir, data, tmp_path / "run", train_projector=True
    )
    recipe = load_recipe(r)
    table = parameter_table(apply_method(load_model(tiny_vision_dir), recipe)).splitlines()
    rows = {line[:28].strip(): line[28:].split() for line in table[1:]}
    assert rows["projector"] == [f"{projector:,}", "0"]
    assert rows["decoder layers: LoRA"] == [f"{lora:,}", "0"]
    trainable, frozen = lora + projector, own - projector
    share = f"({100 * trainable / (trainable + frozen):.2f}%"
    assert rows["total"] == [f"{trainable:,}", f"{frozen:,}", share, "trainable)"]


def test_card_paths_are_the_recipes(text_run, tiny_dir):
    """Relative paths in the recipe: the card (run's and adapter/'s) writes every path as the
    recipe does, and no absolute path of this machine."""
    model = os.path.relpath(tiny_dir, text_run)
    for card in (text_run / "run" / "README.md", text_run / "run" / "adapter" / "README.md"):
        text = card.read_text()
        assert str(text_run.parent) not in text  # neither the model's nor the run's folder
        assert f"base_model: {model}\n" in text and f"| base model | `{model}` |" in text
        assert f"of the Gemma 3 model `{model}`, trained" in text
        assert "| data | chat.jsonl |" in text and "output_dir: run\n" in text
        assert 'gemma3-tune generate run --prompt "Hello"' in text
        assert "gemma3-tune export run --out merged " in text


def test_checkpoints_carry_the_adapters_tokenizer_files(text_run):
    """Every checkpoint-N/ holds the tokenizer files adapter/ holds (tokenizer.model and the
    chat template included), byte for byte, and transformers reads the same template."""
    run = text_run / "run"

    def files(folder: Path) -> dict[str, bytes]:
        return {n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).is_file()}

    adapter = files(run / "adapter")
    assert {"tokenizer.model", "tokenizer.json", "chat_template.jinja"} <= set(adapter)
    template = transformers.AutoTokenizer.from_pretrained(run / "adapter").chat_template
    assert "<start_of_turn>" in template
    for n in (1, 2):
        ckpt = run / f"checkpoint-{n}"
        assert files(ckpt) == adapter, n
        assert transformers.AutoTokenizer.from_pretrained(ckpt).chat_template == template


def _auto_peft_logits(adapter: Path, ids: torch.Tensor, **inputs) -> torch.Tensor:
    """`peft.AutoPeftModelForCausalLM.from_pretrained(adapter)`: the base (transformers' own
    Gemma 3 class, from adapter_config.json) and the adapter, with no code of ours."""
    import peft

    model = peft.AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
    assert type(model.get_base_model()).__module__.startswith("transformers.")
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **inputs).logits


def _our_logits(base: Path, adapter: Path, ids: torch.Tensor, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return load_with_adapter(base, adapter).eval()(ids, **inputs).logits


def test_adapters_load_with_auto_peft_onto_transformers(text_run, tiny_dir):
    """adapter/, a checkpoint-N/ and `export --adapter-only` load with AutoPeftModelForCausalLM
    onto transformers' Gemma3ForCausalLM, with our model + adapter's logits. peft grows the
    embeddings by one row for the tokenizer's added `<mask>` (513 tokens for 512 rows in the
    tiny model): the real vocabulary's columns are compared."""
    run = text_run / "run"
    cwd = os.getcwd()
    os.chdir(text_run)  # the recipe's relative model path starts where training ran
    try:
        assert main(["export", "run", "--adapter-only", "--out", "exported"]) == 0
    finally:
        os.chdir(cwd)
    ids = torch.randint(5, 400, (1, 24), generator=torch.Generator().manual_seed(0))
    vocab = load_model(tiny_dir).config.vocab_size
    with torch.no_grad():
        base = load_model(tiny_dir).eval()(ids).logits
    for adapter in (run / "adapter", run / "checkpoint-1", text_run / "exported"):
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == str(tiny_dir.resolve())
        ours = _our_logits(tiny_dir, adapter, ids)
        theirs = _auto_peft_logits(adapter, ids)[..., :vocab]
        assert (theirs - ours).abs().max().item() <= 1e-4, adapter
        assert (ours - base).abs().max().item() > 1e-3  # the adapter changes the logits


def test_vision_adapter_with_projector_loads_with_auto_peft(tmp_path, tiny_vision_dir):
    """LoRA + the trained projector (peft modules_to_save) on tiny-vision: AutoPeftModel builds
    Gemma3ForConditionalGeneration and gives our logits on a prompt with an image."""
    data = colour_set(tmp_path / "img", 4, seed=3)
    r = write_recipe(
        tmp_path / "r.yaml", tiny_vision_dir, data, tmp_path / "run",
        train_projector=True, training__max_steps=1, training__lr=2e-2,
    )  # fmt: skip
    assert main(["train", str(r)]) == 0
    adapter = tmp_path / "run" / "adapter"
    cfg = load_model(tiny_vision_dir).config
    g = torch.Generator().manual_seed(0)
    n = cfg.mm_tokens_per_image
    ids = torch.randint(5, 400, (1, n + 12), generator=g)
    ids[0, 3 : 3 + n] = cfg.image_token_id
    pixels = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    ours = _our_logits(tiny_vision_dir, adapter, ids, pixel_values=pixels)
    theirs = _auto_peft_logits(
        adapter, ids, pixel_values=pixels, token_type_ids=(ids == cfg.image_token_id).long()
    )
    assert (theirs[..., : cfg.vocab_size] - ours).abs().max().item() <= 1e-4
    with torch.no_grad():
        base = load_model(tiny_vision_dir).eval()(ids, pixel_values=pixels).logits
    assert (ours - base).abs().max().item() > 1e-3  # LoRA and projector changed the logits


def test_the_last_step_is_logged_whatever_logging_steps_says(tmp_path, tiny_dir, capsys):
    """5 steps with logging_steps 2: metrics.jsonl, the console and the model card end at step
    5 (they ended at step 4)."""
    from gemma3_tune.cli import main

    run = tmp_path / "run"
    r = write_recipe(
        tmp_path / "r.yaml", tiny_dir, chat_set(tmp_path / "c.jsonl", 16), run,
        training__max_steps=5, training__logging_steps=2, training__save_steps=100,
    )  # fmt: skip
    capsys.readouterr()
    assert main(["train", str(r)]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows if "loss" in x] == [
        1,
        2,
        4,
        5,
    ]  # the first, every 2nd, the last
    assert "step 5/5" in capsys.readouterr().err
    assert "at step 5 (" in (run / "README.md").read_text()


def test_tensorboard_gets_the_logged_losses(tmp_path, tiny_dir, capsys):
    """training.report_to: [tensorboard] writes an event file under output_dir/tensorboard whose
    train/loss scalars are metrics.jsonl's; a tracker that is not installed is one line."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gemma3_tune.cli import main

    run = tmp_path / "run"
    r = write_recipe(
        tmp_path / "r.yaml", tiny_dir, chat_set(tmp_path / "c.jsonl", 16), run,
        training__max_steps=3, training__logging_steps=1, training__save_steps=100,
        training__report_to=["tensorboard"],
    )  # fmt: skip
    os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
    assert main(["train", str(r)]) == 0
    (events,) = (run / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    want = [(x["step"], x["loss"]) for x in rows if "loss" in x]
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    capsys.readouterr()
    over = [f"training.output_dir={tmp_path / 'run2'}", "training.report_to=[mlflow]"]
    if __import__("importlib").util.find_spec("mlflow") is None:
        assert main(["train", str(r), *over]) == 2
        assert "training.report_to: mlflow is not installed" in capsys.readouterr().err
