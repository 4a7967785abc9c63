"""Write a Gemma 3 text model as GGUF (f32, f16, bf16, q4_0, q5_0, q8_0) with its tokenizer and
chat template (K-quants: hf_export.py hands this file to llama.cpp's own quantizer).

The layout mirrors what llama.cpp's converter writes for Gemma 3 (architecture `gemma3`,
`blk.N.*` tensor names from gguf_import.LAYER_NAMES, norms stored as 1 + w, an SPM-style
("llama") vocabulary with scores and token types). Vision weights are not part of this file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..convert.gguf_import import GLOBAL_NAMES, LAYER_NAMES
from ..model.formats import FORMATS, GGUF_TYPES
from ..model.gemma3 import Gemma3

# HF name -> (GGUF name, is_norm), the inverse of the import table.
_LAYER_INV = {hf: (g, norm) for g, (hf, norm) in LAYER_NAMES.items()}
_GLOBAL_INV = {hf: (g, norm) for g, (hf, norm) in GLOBAL_NAMES.items()}


def hf_to_gguf_name(key: str) -> tuple[str, bool] | None:
    """`model.layers.3.self_attn.q_proj.weight` -> (`blk.3.attn_q.weight`, False)."""
    key = key.removeprefix("model.language_model.").removeprefix("model.")
    base = key.removesuffix(".weight")
    if base.startswith("layers."):
        _, idx, rest = base.split(".", 2)
        if rest in _LAYER_INV:
            g, norm = _LAYER_INV[rest]
            return f"blk.{idx}.{g}.weight", norm
        return None
    if "model." + base in _GLOBAL_INV:
        g, norm = _GLOBAL_INV["model." + base]
        return f"{g}.weight", norm
    return None


def _vocab(folder: Path, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types, from tokenizer.model (sentencepiece) or tokenizer.json.

    For a BPE vocabulary converted from sentencepiece (Gemma's), piece ids follow merge order,
    so score = -id reproduces sentencepiece's own scores' ordering.
    """
    import gguf

    tokens, scores, types = [], [], []
    sp_file = folder / "tokenizer.model"
    if sp_file.is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(sp_file))
        for i in range(sp.get_piece_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(sp.get_score(i))
            if sp.is_unknown(i):
                types.append(gguf.TokenType.UNKNOWN)
            elif sp.is_control(i):
                types.append(gguf.TokenType.CONTROL)
            elif sp.is_byte(i):
                types.append(gguf.TokenType.BYTE)
            elif sp.is_unused(i):
                types.append(gguf.TokenType.UNUSED)
            else:
                types.append(gguf.TokenType.NORMAL)
    else:
        tj = json.loads((folder / "tokenizer.json").read_text())
        vocab = tj["model"]["vocab"]
        added = {t["id"]: t for t in tj.get("added_tokens", [])}
        by_id = {i: tok for tok, i in vocab.items()}
        for t in added.values():
            by_id.setdefault(t["id"], t["content"])
        for i in range(max(by_id) + 1):
            tok = by_id.get(i, f"<unused_{i}>")
            tokens.append(tok)
            scores.append(-float(i))
            if i in added and added[i].get("special"):
                types.append(gguf.TokenType.UNKNOWN if tok == "<unk>" else gguf.TokenType.CONTROL)
            elif i in added:
                types.append(gguf.TokenType.USER_DEFINED)
            elif tok.startswith("<0x") and tok.endswith(">") and len(tok) == 6:
                types.append(gguf.TokenType.BYTE)
            else:
                types.append(gguf.TokenType.NORMAL)
    while len(tokens) < vocab_size:  # the embedding matrix may be padded past the vocabulary
        tokens.append(f"<pad_{len(tokens)}>")
        scores.append(-1e9)
        types.append(gguf.TokenType.UNUSED)
    return tokens, scores, [int(t) for t in types]


BLOCK_FORMATS = FORMATS  # written here, by the gguf package (model/quants.py's registry)


def file_type(dtype: str):
    """general.file_type for an f32 / f16 / bf16 / q4_0 / q5_0 / q8_0 export."""
    import gguf

    return getattr(gguf.LlamaFileType, GGUF_TYPES[dtype].file_type)


def add_tensor(writer, name: str, t: torch.Tensor, kind: str) -> str:
    """Add `t` stored as f32, f16, bf16 (raw 16-bit patterns) or a ggml block format (blocks of
    32 values sharing one f16 scale, quantized by the gguf package as llama.cpp's converter
    does; bitwise what model/quants.py's fake quantization trains with). A matrix whose width
    is not a multiple of 32 cannot be stored in blocks: it is kept in f16, as llama.cpp's
    converter does. Returns the kind written."""
    import gguf

    if kind in BLOCK_FORMATS and t.shape[-1] % 32 != 0:
        kind = "f16"
    if kind in BLOCK_FORMATS:
        qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
        writer.add_tensor(
            name, gguf.quants.quantize(t.numpy().astype(np.float32), qtype), raw_dtype=qtype
        )
    elif kind == "f32":
        writer.add_tensor(name, t.numpy().astype(np.float32))
    elif kind == "f16":
        writer.add_tensor(name, t.numpy().astype(np.float16))
    else:
        raw = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        writer.add_tensor(
            name, raw, raw_shape=list(t.shape), raw_dtype=gguf.GGMLQuantizationType.BF16
        )
    return kind


def write_gguf(
    model: Gemma3,
    tokenizer_dir: Path,
    path: Path,
    dtype: str = "f16",
    name: str = "gemma3-tune",
    embeddings: str | None = None,
) -> None:
    """`dtype` for every matrix; `embeddings` (default: `dtype`) for the tied token embedding,
    which is also the LM head; norms (1-D) stay f32 whatever the file type, as llama.cpp's."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_name(name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_sliding_window(c.sliding_window)
    if c.rope_scaling_factor != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_scaling_factor)
    w.add_file_type(file_type(dtype))

    tokens, scores, types = _vocab(tokenizer_dir, c.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(c.bos_token_id)
    eos = c.eos_token_id[0] if isinstance(c.eos_token_id, list) else c.eos_token_id
    w.add_eos_token_id(eos)
    w.add_pad_token_id(c.pad_token_id)
    w.add_unk_token_id(3)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    from ..data.template import CHAT_TEMPLATE

    w.add_chat_template(CHAT_TEMPLATE)

    state = model.text_model.state_dict()
    for key, t in state.items():
        mapped = hf_to_gguf_name("model." + key)
        if mapped is None:
            raise ValueError(f"no GGUF name for {key}")
        gname, is_norm = mapped
        t = t.detach().float()
        if is_norm:
            t = t + 1.0  # GGUF stores 1 + w
        # llama.cpp keeps 1-D tensors (norms) in f32 whatever the file type.
        kind = "f32" if t.dim() == 1 else dtype
        if gname == "token_embd.weight" and embeddings is not None:
            kind = embeddings
        add_tensor(w, gname, t, kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
