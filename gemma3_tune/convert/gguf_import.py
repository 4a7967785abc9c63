"""Import a Gemma 3 GGUF (llama.cpp's format) as an HF-format folder: weights, config, tokenizer.

Weights are read and de-quantized with the `gguf` package and renamed through one table.
GGUF stores RMSNorm weights as `1 + w`; HF checkpoints store `w`, so norms get 1 subtracted.
Facts llama.cpp hard-codes for Gemma 3, and so do we (GGUF has no key for them):
- the local (sliding-layer) RoPE base is 10,000, and 5 sliding layers alternate with 1 global;
- the attention scale is head_dim ** -0.5, except for 27B (62 layers), where it is
  (hidden / heads) ** -0.5 = 168 ** -0.5.
The tokenizer is converted by transformers' GGUF reader and saved as tokenizer.json.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..model.checkpoint import save_model
from ..model.config import Gemma3Config
from ..model.gemma3 import Gemma3
from ..outputs import refuse_existing, staged_dir

# GGUF tensor name -> HF name inside a text decoder layer (`model.layers.{i}.` prefix), and
# whether it is a norm stored as 1 + w.
LAYER_NAMES: dict[str, tuple[str, bool]] = {
    "attn_q": ("self_attn.q_proj", False),
    "attn_k": ("self_attn.k_proj", False),
    "attn_v": ("self_attn.v_proj", False),
    "attn_output": ("self_attn.o_proj", False),
    "attn_q_norm": ("self_attn.q_norm", True),
    "attn_k_norm": ("self_attn.k_norm", True),
    "attn_norm": ("input_layernorm", True),
    "post_attention_norm": ("post_attention_layernorm", True),
    "ffn_norm": ("pre_feedforward_layernorm", True),
    "post_ffw_norm": ("post_feedforward_layernorm", True),
    "ffn_gate": ("mlp.gate_proj", False),
    "ffn_up": ("mlp.up_proj", False),
    "ffn_down": ("mlp.down_proj", False),
}
GLOBAL_NAMES: dict[str, tuple[str, bool]] = {
    "token_embd": ("model.embed_tokens", False),
    "output_norm": ("model.norm", True),
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def gguf_to_hf_name(name: str) -> tuple[str, bool] | None:
    """`blk.3.attn_q.weight` -> (`model.layers.3.self_attn.q_proj.weight`, is_norm)."""
    if m := _BLOCK.match(name):
        layer, part = m.groups()
        if part in LAYER_NAMES:
            hf, is_norm = LAYER_NAMES[part]
            return f"model.layers.{layer}.{hf}.weight", is_norm
        return None
    base = name.removesuffix(".weight")
    if base in GLOBAL_NAMES:
        hf, is_norm = GLOBAL_NAMES[base]
        return f"{hf}.weight", is_norm
    return None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def config_from_gguf(reader, path: Path) -> Gemma3Config:
    arch = _field(reader, "general.architecture")
    if arch != "gemma3":
        raise UserError(
            f"{path}: general.architecture is {arch!r}; only Gemma 3 ('gemma3') GGUFs are supported"
        )
    a = "gemma3."
    n_layers = int(_field(reader, a + "block_count"))
    hidden = int(_field(reader, a + "embedding_length"))
    heads = int(_field(reader, a + "attention.head_count"))
    head_dim = int(_field(reader, a + "attention.key_length", 256))
    scaling = _field(reader, a + "rope.scaling.type")
    factor = float(_field(reader, a + "rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return Gemma3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_field(reader, a + "feed_forward_length")),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, a + "attention.head_count_kv", heads)),
        head_dim=head_dim,
        query_pre_attn_scalar=hidden // heads if n_layers == 62 else head_dim,
        rms_norm_eps=float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-6)),
        sliding_window=int(_field(reader, a + "attention.sliding_window", 512)),
        rope_theta=float(_field(reader, a + "rope.freq_base", 1e6)),
        rope_local_base_freq=10_000.0,
        rope_scaling_factor=factor,
        max_position_embeddings=int(_field(reader, a + "context_length", 32768)),
        pad_token_id=int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 1)),
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 2)),
    )


def read_gguf_weights(reader, path: Path) -> dict[str, torch.Tensor]:
    """De-quantized fp32 tensors under HF names (text-only `Gemma3ForCausalLM` layout)."""
    from gguf.quants import dequantize

    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        mapped = gguf_to_hf_name(t.name)
        if mapped is None:
            if t.name.startswith(("v.", "mm.")):
                raise UserError(
                    f"{path}: vision tensors ({t.name}) are not supported by import-gguf; import the text model only"
                )
            raise UserError(f"{path}: unknown tensor {t.name!r}; is this a Gemma 3 GGUF?")
        name, is_norm = mapped
        arr = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # a writable copy
        w = torch.from_numpy(arr)
        out[name] = w - 1.0 if is_norm else w
    return out


def import_gguf(
    gguf_path: str | os.PathLike, out: str | os.PathLike, *, force: bool = False
) -> Path:
    """Write an HF-format folder (config.json, model.safetensors, tokenizer) from a GGUF file."""
    from gguf import GGUFReader

    gguf_path, out = Path(gguf_path), Path(out)
    if not gguf_path.is_file():
        raise UserError(f"{gguf_path}: no such file")
    refuse_existing(out, force)
    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as e:  # the gguf package raises bare ValueErrors on bad magic/versions
        raise UserError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    config = config_from_gguf(reader, gguf_path)
    state = read_gguf_weights(reader, gguf_path)
    with torch.device("meta"):
        model = Gemma3(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise UserError(f"{gguf_path}: missing tensors for {', '.join(missing[:3])}")
    with staged_dir(out, force) as tmp:
        save_model(model, tmp, state_dict=state)
        _save_tokenizer(gguf_path, tmp)
    return out


def _save_tokenizer(gguf_path: Path, out: Path) -> None:
    """transformers converts the GGUF vocabulary to a fast tokenizer (tokenizer.json)."""
    from transformers import AutoTokenizer

    from ..data.template import ensure_chat_template

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))
    ensure_chat_template(out)
