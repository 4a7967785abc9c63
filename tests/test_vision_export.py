"""Vision exports: the mmproj GGUF holds our tower and projector, tensor for tensor; the vLLM
adapter names its modules as vLLM's Gemma 3 does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import load_file
from trainutil import chat_set, colour_set, write_recipe

from gemma3_tune.cli import main
from gemma3_tune.export.hf_export import merged_model
from gemma3_tune.model.checkpoint import ours_to_hf


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_vision_dir):
    """A vision adapter (LoRA + trained projector) and a LoRA-only run, on tiny-vision."""
    d = tmp_path_factory.mktemp("vision-export")
    r = write_recipe(
        d / "v.yaml", tiny_vision_dir, colour_set(d / "img", 8, seed=7), d / "vision",
        train_projector=True, training__max_steps=3,
    )  # fmt: skip
    assert main(["train", str(r)]) == 0
    r = write_recipe(
        d / "l.yaml", tiny_vision_dir, chat_set(d / "c.jsonl", n=8), d / "lora",
        training__max_steps=2,
    )  # fmt: skip
    assert main(["train", str(r)]) == 0
    return d


# Our published names -> the names llama.cpp's Gemma 3 mmproj uses (written out by hand from
# llama.cpp's tensor table, independently of the gguf package's map that the exporter uses).
def _expected_gguf_name(hf: str) -> tuple[str, bool]:
    fixed = {
        "vision_tower.vision_model.embeddings.patch_embedding.weight": "v.patch_embd.weight",
        "vision_tower.vision_model.embeddings.patch_embedding.bias": "v.patch_embd.bias",
        "vision_tower.vision_model.embeddings.position_embedding.weight": "v.position_embd.weight",
        "vision_tower.vision_model.post_layernorm.weight": "v.post_ln.weight",
        "vision_tower.vision_model.post_layernorm.bias": "v.post_ln.bias",
        "multi_modal_projector.mm_input_projection_weight": "mm.input_projection.weight",
        "multi_modal_projector.mm_soft_emb_norm.weight": "mm.soft_emb_norm.weight",
    }
    if hf in fixed:
        return fixed[hf], hf.endswith("soft_emb_norm.weight")
    layer = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
        "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
    }  # fmt: skip
    rest = hf.removeprefix("vision_tower.vision_model.encoder.layers.")
    idx, tail = rest.split(".", 1)
    module, kind = tail.rsplit(".", 1)
    return f"v.blk.{idx}.{layer[module]}.{kind}", False


def test_mmproj_gguf_tensors_equal_our_tower_and_projector(runs, tmp_path, capsys):
    out = tmp_path / "tiny.gguf"
    argv = ["export", str(runs / "vision"), "--format", "gguf", "--gguf-dtype", "f32"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "mmproj-tiny.gguf" in capsys.readouterr().err
    reader = GGUFReader(str(tmp_path / "mmproj-tiny.gguf"))
    fields = {f.name: f for f in reader.fields.values()}

    def value(key):
        f = fields[key]
        return f.contents()

    assert value("general.architecture") == "clip"
    assert value("general.type") == "mmproj"
    assert value("clip.projector_type") == "gemma3"
    model, _, _, _ = merged_model(runs / "vision")  # the trained projector folded in
    v = model.config.vision
    assert value("clip.vision.block_count") == v.num_hidden_layers
    assert value("clip.vision.embedding_length") == v.hidden_size
    assert value("clip.vision.projection_dim") == model.config.hidden_size
    assert value("clip.vision.image_size") == v.image_size
    assert value("clip.vision.patch_size") == v.patch_size

    ours = {
        ours_to_hf(k, "published"): t for k, t in model.state_dict().items()
        if ours_to_hf(k, "published").startswith(("vision_tower.", "multi_modal_projector."))
    }  # fmt: skip
    written = {t.name: t for t in reader.tensors}
    assert len(written) == len(ours)
    for key, want in ours.items():
        name, plus_one = _expected_gguf_name(key)
        t = written[name]
        got = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(want.shape)
        want = want.float().numpy() + (1.0 if plus_one else 0.0)
        tol = 1e-3 if name.startswith("mm.input_projection") else 0.0  # stored as f16
        assert np.allclose(got, want, rtol=tol, atol=tol), name
    # The trained projector, not the base one, is what went out.
    base = load_file(str(runs / "vision" / "adapter" / "adapter_model.safetensors"))
    assert any("multi_modal_projector" in k for k in base)


def test_vllm_adapter_names_match_the_language_model(runs, tmp_path, tiny_vision_dir):
    """Module names in the vLLM adapter are transformers' Gemma 3 language-model modules,
    under the prefix vLLM's Gemma 3 gives them (`language_model.model.`)."""
    out = tmp_path / "vllm"
    argv = ["export", str(runs / "lora"), "--adapter-only", "--for", "vllm", "--out", str(out)]
    assert main(argv) == 0
    weights = load_file(str(out / "adapter_model.safetensors"))
    modules = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in weights}
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(tiny_vision_dir)
    lm_linears = {
        "language_model.model." + n.removeprefix("model.language_model.")
        for n, m in hf.named_modules()
        if n.startswith("model.language_model.") and isinstance(m, torch.nn.Linear)
    }
    assert modules == lm_linears  # every decoder linear, and nothing of the vision tower
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert not cfg.get("modules_to_save")
    # The same tensors as the peft adapter, only renamed.
    peft_w = load_file(str(runs / "lora" / "adapter" / "adapter_model.safetensors"))
    assert len(peft_w) == len(weights)
    for k, t in peft_w.items():
        vk = k.replace(
            "base_model.model.model.language_model.", "base_model.model.language_model.model."
        )
        assert torch.equal(weights[vk], t)


def test_vllm_refuses_a_trained_projector(runs, tmp_path, capsys):
    argv = ["export", str(runs / "vision"), "--adapter-only", "--for", "vllm"]
    assert main([*argv, "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "projector" in err and "--merge" in err
    assert not (tmp_path / "v").exists()


def test_merged_vision_export_opens_with_auto_processor(runs, tmp_path):
    """A trained vision run's merged export: AutoProcessor loads it and prepares one image and
    text as our own preprocessing does (issue 25, item 8)."""
    from test_processor_files import check_auto_processor

    out = tmp_path / "merged"
    assert main(["export", str(runs / "vision"), "--out", str(out), "--merge"]) == 0
    check_auto_processor(out)
