"""QLoRA's 4-bit base, defined once: training, export and the benchmark's transformers side
all build it here, so what trains is what merges and what is compared.

bitsandbytes' NF4 with double quantization (`compress_statistics`, QLoRA's default and
transformers' `bnb_4bit_use_double_quant`): the per-block absmax is itself quantized to 8 bits.
Each weight is quantized from the compute dtype (bf16 on a GPU), so `quant_state.dtype` is the
compute dtype and every forward and backward dequantizes straight into it.

Loading quantizes one tensor at a time while reading the safetensors files: the full-precision
model never exists, on the device or on the host (peak: the 4-bit model, the embeddings and
norms, plus one weight). The run records the settings in `qlora.json`; the export rebuilds the
same base from the same stored weights with `dequantized_base` (the same function and device
kind), and merges the adapter onto it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..model.checkpoint import checked_keys, iter_state, read_config
from ..model.gemma3 import Gemma3

QUANT_TYPE = "nf4"
DOUBLE_QUANT = True  # compress_statistics: quantize the absmax statistics too
QUANT_STORAGE = torch.uint8
BLOCKSIZE = 64  # bitsandbytes' default for 4-bit
SETTINGS_FILE = "qlora.json"
# A decoder layer's module name: `model.layers.N` (text-only) or `model.language_model.layers.N`
# (multimodal). Anchored on the language model: SigLIP's `model.vision_tower.encoder.layers.N.
# self_attn.q_proj` ends the same way and must stay in full precision.
DECODER_LAYER = r"model\.(?:language_model\.)?layers\.\d+"
_QUANTIZED = re.compile(
    DECODER_LAYER + r"\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight"
)


def hf_quantization_config(compute_dtype: torch.dtype):
    """The same settings as transformers' BitsAndBytesConfig (benchmarks, references)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=QUANT_TYPE,
        bnb_4bit_use_double_quant=DOUBLE_QUANT,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=QUANT_STORAGE,
    )


def is_quantized_weight(key: str) -> bool:
    """Decoder linear weights (`model.layers.N.self_attn.q_proj.weight`, ...) are the 4-bit
    ones; embeddings/LM head, norms, the vision tower and the projector stay in full precision."""
    return _QUANTIZED.fullmatch(key) is not None


def nf4_weight(weight: torch.Tensor, compute_dtype: torch.dtype, device) -> nn.Parameter:
    """`[out, in]` weight -> a quantized bitsandbytes Params4bit on `device` (quantization runs
    on the device it is moved to, from the weight in the compute dtype)."""
    import bitsandbytes as bnb

    p = bnb.nn.Params4bit(
        weight.detach().to(compute_dtype),
        requires_grad=False,
        quant_type=QUANT_TYPE,
        compress_statistics=DOUBLE_QUANT,
        quant_storage=QUANT_STORAGE,
        blocksize=BLOCKSIZE,
    )
    return p.to(device)


def linear4bit(weight: torch.Tensor, compute_dtype: torch.dtype, device) -> nn.Module:
    """A bias-free bitsandbytes Linear4bit holding `weight` in NF4.

    It always computes as it trains: dequantize into the compute dtype, then matmul. On CPUs
    with AVX512-BF16, bitsandbytes 0.50 would otherwise switch a Linear4bit in eval mode under
    no_grad to a packed bf16 kernel (bf16 activations and bf16 block scales, whatever the
    compute dtype) and keep the weight repacked: the DPO reference, eval and the export check
    would score another model than the one that trains (measured: 0.045 in logits, fp32)."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    with torch.device("meta"):
        q = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=False,
            compute_dtype=compute_dtype,
            quant_type=QUANT_TYPE,
            compress_statistics=DOUBLE_QUANT,
            quant_storage=QUANT_STORAGE,
        )
    q.weight = nf4_weight(weight, compute_dtype, device)
    q.support_avx512bf16_for_cpu = False  # read by Linear4bit.forward: never the packed path
    return q


def dequantized_base(weight: torch.Tensor, compute_dtype: torch.dtype, device) -> torch.Tensor:
    """The weight a QLoRA run trains against: `weight` through `nf4_weight` and back, in the
    compute dtype, on the CPU. [out, in] -> [out, in]."""
    import bitsandbytes.functional as bnbf

    p = nf4_weight(weight, compute_dtype, device)
    return bnbf.dequantize_4bit(p.data, p.quant_state).cpu()


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def mark_4bit(model: Gemma3) -> None:
    """peft picks its bitsandbytes LoRA layer (and its merge) from this attribute, as
    transformers sets it on models loaded in 4 bits."""
    model.is_loaded_in_4bit = True


def load_quantized(
    path: str | Path, compute_dtype: torch.dtype, device, attn_backend: str = "auto"
) -> Gemma3:
    """Load an HF folder with the decoder linears in NF4, one tensor at a time."""
    config = read_config(path)
    with torch.device("meta"):
        model = Gemma3(config, attn_backend=attn_backend)
    expected = model.state_dict()
    checked_keys(path, expected, iter_state(path, config, read=False))
    for key, tensor in iter_state(path, config):
        if is_quantized_weight(key):
            _set_module(model, key[: -len(".weight")], linear4bit(tensor, compute_dtype, device))
        else:
            module, _, leaf = key.rpartition(".")
            value = tensor.to(device, compute_dtype)
            setattr(model.get_submodule(module), leaf, nn.Parameter(value, requires_grad=False))
        del tensor
    if model.vision_tower is not None:
        model.vision_tower.requires_grad_(False)
    mark_4bit(model)
    return model


def quantize_decoder(model: Gemma3, compute_dtype: torch.dtype) -> int:
    """Replace the decoder linears of a loaded model with NF4 ones (the benchmark builds random
    models this way); training loads with `load_quantized` instead."""
    device = next(model.parameters()).device
    n = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and is_quantized_weight(name + ".weight"):
            _set_module(model, name, linear4bit(module.weight.data, compute_dtype, device))
            n += 1
    mark_4bit(model)
    return n


def write_settings(run: Path, compute_dtype: torch.dtype, device: torch.device) -> None:
    """qlora.json in the run: what the export needs to rebuild the same base."""
    settings = {
        "quant_type": QUANT_TYPE,
        "double_quant": DOUBLE_QUANT,
        "blocksize": BLOCKSIZE,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "device": torch.device(device).type,
    }
    (run / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def read_settings(run: Path) -> tuple[torch.dtype, str]:
    """(compute dtype, device kind) a QLoRA run quantized with. Runs from before qlora.json
    quantized from fp32 on the CPU or GPU they ran on (double quantization, as now)."""
    f = run / SETTINGS_FILE
    if not f.is_file():
        return torch.float32, "cuda" if torch.cuda.is_available() else "cpu"
    s = json.loads(f.read_text())
    device = s.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"  # bitsandbytes' CPU NF4 equals its CUDA one (tests/test_gpu.py checks)
    return getattr(torch, s["compute_dtype"]), device


def dequantize_like_run(model: Gemma3, run: Path) -> None:
    """Replace the decoder linears of a full-precision model with the NF4 base the QLoRA run
    trained against (in the model's dtype), before its adapter is merged."""
    compute_dtype, device = read_settings(run)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and is_quantized_weight(name + ".weight"):
            w = module.weight.data
            module.weight.data = dequantized_base(w, compute_dtype, device).to(w.dtype)
