"""Weights out: what we save, transformers 5 loads (same logits); sharding; clear key errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from reference import hf_model, save_hf
from safetensors.torch import load_file, save_file

from gemma3_tune.cli import main
from gemma3_tune.model import CheckpointError, load_model, save_model

IMG = 500


def _vision(tmp_path):
    from gemma3_tune.model import preset

    cfg = preset("tiny-vision").replace(image_token_id=IMG, boi_token_id=498, eoi_token_id=499)
    return load_model(save_hf(hf_model(cfg), tmp_path / "src")).eval()


@pytest.mark.parametrize("layout", ["published", "memory"])
def test_saved_multimodal_loads_in_transformers(layout, tmp_path):
    ours = _vision(tmp_path)
    save_model(ours, tmp_path / "out", layout=layout, max_shard_bytes=200_000)  # forces shards
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ref = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(4, 490, (1, 40))
    ids[0, 3:19] = IMG
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = ref(
            ids, pixel_values=pixels, token_type_ids=(ids == IMG).long(), use_cache=False
        ).logits
        got = ours(ids, pixel_values=pixels).logits
    assert (got - want).abs().max().item() <= 1e-4
    again = load_model(tmp_path / "out").eval()  # and our own round trip
    with torch.no_grad():
        assert torch.equal(again(ids, pixel_values=pixels).logits, got)


def test_saved_text_model_loads_in_transformers(tmp_path):
    assert main(["init-model", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    ours = load_model(tmp_path / "m").eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(4, 500, (2, 50))
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids, use_cache=False).logits).abs().max().item() <= 1e-4


def test_init_model_tokenizer_has_gemma_specials(tmp_path):
    import sentencepiece as spm

    assert main(["init-model", "--preset", "tiny-vision", "--out", str(tmp_path / "m")]) == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m" / "tokenizer.model"))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    ids = {
        p: sp.piece_to_id(p)
        for p in ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    }
    assert ids == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 4, "<end_of_turn>": 5}
    assert cfg["image_token_id"] == sp.piece_to_id("<image_soft_token>")
    assert cfg["boi_token_id"] == sp.piece_to_id("<start_of_image>")
    assert cfg["eoi_token_id"] == sp.piece_to_id("<end_of_image>")
    text = "<start_of_turn>user\nhello 42 ☃<end_of_turn>\n"
    assert hf(text, add_special_tokens=False).input_ids == sp.encode(text)
    assert sp.decode(sp.encode(text)) == text
    m = load_model(tmp_path / "m")
    proj = m.projector.mm_input_projection_weight
    assert proj.abs().min().item() >= 0 and proj.std().item() > 0.01  # randomised, not zero


def test_unknown_and_missing_keys_are_named(tmp_path):
    assert main(["init-model", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    f = tmp_path / "m" / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.self_attn.bogus.weight"] = torch.zeros(1)
    save_file(sd, f)
    with pytest.raises(CheckpointError, match="bogus"):
        load_model(tmp_path / "m")
    del sd["model.layers.0.self_attn.bogus.weight"]
    del sd["model.layers.2.mlp.up_proj.weight"]
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"missing model\.layers\.2\.mlp\.up_proj\.weight"):
        load_model(tmp_path / "m")


def test_cli_refuses_overwrite_and_bad_folder(tmp_path, capsys):
    assert main(["init-model", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    assert main(["init-model", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["init-model", "--preset", "huge", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.gguf").write_bytes(b"not a gguf")
    assert (
        main(["import-gguf", str(tmp_path / "bad" / "x.gguf"), "--out", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "x.gguf" in err and err.count("\n") == 1


def _assert_carries_chat_template(folder) -> None:
    """chat_template.jinja and tokenizer_config.json's chat_template, which transformers
    applies to the same ids as our template renders, and transformers_version in config.json."""
    from importlib.metadata import version

    from gemma3_tune.data.template import Turn, render
    from gemma3_tune.data.tokenizer import Tokenizer

    assert (folder / "chat_template.jinja").is_file()
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["transformers_version"] == version("transformers")
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How many apples?"},
        {"role": "assistant", "content": "Twelve."},
    ]
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    got = hf.apply_chat_template(msgs, tokenize=True, return_dict=False)
    turns = [Turn(m["role"], [m["content"]]) for m in msgs]
    assert list(got) == render(turns, Tokenizer(folder), None).input_ids


def test_every_folder_we_write_carries_the_chat_template(tmp_path):
    assert main(["init-model", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    _assert_carries_chat_template(tmp_path / "m")
