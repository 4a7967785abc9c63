"""Export: merged HF folders and peft adapters agree with transformers + peft; generate CLI."""

from __future__ import annotations

import pytest
import torch
import transformers
from trainutil import colour_set, write_recipe

from gemma3_tune.cli import main
from gemma3_tune.model import load_model


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_vision_dir):
    d = tmp_path_factory.mktemp("export")
    data = colour_set(d / "img", 24, seed=5)
    r = write_recipe(
        d / "r.yaml", tiny_vision_dir, data, d / "run", train_projector=True, training__max_steps=12
    )
    assert main(["train", str(r)]) == 0
    return d


def _probe(cfg):
    g = torch.Generator().manual_seed(0)
    n = cfg.mm_tokens_per_image
    ids = torch.randint(5, 400, (1, n + 20), generator=g)
    ids[0, 3 : 3 + n] = cfg.image_token_id
    return ids, torch.rand(1, 3, 64, 64, generator=g) * 2 - 1


def test_merged_export_matches_transformers_plus_peft(run, tiny_vision_dir):
    import peft

    d = run
    assert main(["export", str(d / "run"), "--out", str(d / "merged"), "--dtype", "float32"]) == 0
    assert main(["export", str(d / "run"), "--adapter-only", "--out", str(d / "adapter")]) == 0
    cfg = load_model(tiny_vision_dir).config
    ids, pixels = _probe(cfg)
    tt = (ids == cfg.image_token_id).long()
    cls = transformers.Gemma3ForConditionalGeneration

    def hf_logits(model):
        with torch.no_grad():
            return model(
                input_ids=ids, pixel_values=pixels, token_type_ids=tt, use_cache=False
            ).logits

    merged_hf = hf_logits(cls.from_pretrained(d / "merged").eval())
    with_peft = hf_logits(
        peft.PeftModel.from_pretrained(cls.from_pretrained(tiny_vision_dir), d / "adapter").eval()
    )
    base = hf_logits(cls.from_pretrained(tiny_vision_dir).eval())
    with torch.no_grad():
        ours = load_model(d / "merged").eval()(ids, pixel_values=pixels).logits
    assert (merged_hf - with_peft).abs().max().item() <= 1e-4
    assert (ours - merged_hf).abs().max().item() <= 1e-4
    assert (merged_hf - base).abs().max().item() > 1e-2  # training moved the logits
    from test_checkpoint import _assert_carries_chat_template

    _assert_carries_chat_template(d / "merged")


def test_export_refuses_to_overwrite_and_writes_atomically(run, capsys):
    d = run
    (d / "taken").mkdir()
    (d / "taken" / "keep.txt").write_text("mine")
    assert main(["export", str(d / "run"), "--out", str(d / "taken")]) == 2
    assert "--force" in capsys.readouterr().err
    assert (d / "taken" / "keep.txt").read_text() == "mine"
    assert not [p for p in d.iterdir() if ".tmp-" in p.name]  # no staging folder left behind


def test_gguf_export_of_tiny_reads_back(run, tmp_path):
    import numpy as np
    from gguf import GGUFReader

    d = run
    out = tmp_path / "tiny.gguf"
    assert (
        main(
            ["export", str(d / "run"), "--format", "gguf", "--gguf-dtype", "f32", "--out", str(out)]
        )
        == 0
    )
    r = GGUFReader(str(out))
    names = {t.name: t for t in r.tensors}
    merged = load_model(d / "merged") if (d / "merged").exists() else None
    assert "blk.0.attn_q.weight" in names and "token_embd.weight" in names
    if merged is not None:
        norm = np.array(names["output_norm.weight"].data)
        assert np.allclose(norm, merged.text_model.norm.weight.detach().numpy() + 1.0, atol=1e-6)


def _q8_0_by_hand(w):
    """Q8_0 as ggml's quantize_row_q8_0 defines it: blocks of 32 along a row, d = max|x| / 127,
    q = x * (1 / d) rounded half away from zero into int8, d stored as f16; read back as
    q * f16(d)."""
    import numpy as np

    blocks = w.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    x = blocks * inv
    q = np.sign(x) * np.floor(np.abs(x) + 0.5)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(w.shape)


def test_gguf_q8_0_export(run, tmp_path, capsys):
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    from gemma3_tune.export.hf_export import merged_model

    d = run
    out = tmp_path / "tiny-q8.gguf"
    argv = ["export", str(d / "run"), "--format", "gguf", "--quantize", "q8_0", "--out", str(out)]
    assert main(argv) == 0
    tensors = {t.name: t for t in GGUFReader(str(out)).tensors}
    model = merged_model(d / "run")[0]
    q = tensors["blk.0.attn_q.weight"]
    assert q.tensor_type == GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32
    w = model.text_model.layers[0].self_attn.q_proj.weight.detach().numpy()
    got = np.array(dequantize(q.data, q.tensor_type)).reshape(w.shape)
    np.testing.assert_allclose(got, _q8_0_by_hand(w), rtol=0, atol=1e-6)
    assert 0 < np.abs(got - w).max() <= np.abs(w).max() / 127  # really quantized, within a step
    assert main(["export", str(d / "run"), "--quantize", "q8_0", "--out", str(tmp_path / "x")]) == 2
    assert "--quantize applies to --format gguf" in capsys.readouterr().err


def test_generate_cli_cache_equals_no_cache_and_images(run, tiny_vision_dir, capsys):
    d = run
    img = sorted((d / "img").glob("*.png"))[0]
    args = [
        "generate",
        str(d / "run"),
        "--prompt",
        "What colour is this?",
        "--image",
        str(img),
        "--max-new-tokens",
        "12",
    ]
    assert main(args) == 0
    cached = capsys.readouterr().out
    assert main([*args, "--no-cache"]) == 0
    plain = capsys.readouterr().out
    assert cached == plain and cached.strip()
    assert (
        main(["generate", str(tiny_vision_dir), "--prompt", "hello", "--max-new-tokens", "20"]) == 0
    )
    a = capsys.readouterr().out
    assert (
        main(
            [
                "generate",
                str(tiny_vision_dir),
                "--prompt",
                "hello",
                "--max-new-tokens",
                "20",
                "--no-cache",
            ]
        )
        == 0
    )
    assert a == capsys.readouterr().out


def test_interactive_chat_keeps_history(tiny_vision_dir, monkeypatch, capsys):
    """Two lines in --interactive: the second reply is conditioned on the first exchange."""
    from gemma3_tune.data.template import Turn
    from gemma3_tune.data.tokenizer import Tokenizer
    from gemma3_tune.export.inference import chat_ids

    lines = iter(["hello", "and then?", ""])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    assert main(["generate", str(tiny_vision_dir), "--interactive", "--max-new-tokens", "5"]) == 0
    first, second = capsys.readouterr().out.splitlines()[:2]
    tok, model = Tokenizer(tiny_vision_dir), load_model(tiny_vision_dir)
    ids, _ = chat_ids(
        tok, model, "and then?", history=[Turn("user", ["hello"]), Turn("assistant", [first])]
    )
    text = tok.decode(ids[0].tolist(), skip_special=False)
    assert text.count("<start_of_turn>user") == 2 and "hello" in text and second is not None
