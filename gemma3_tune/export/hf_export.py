"""`gemma3-tune export`: merged HF folders, peft adapters, GGUF files.

Every export is written to a temporary folder next to `--out`, verified, then renamed into
place: a crash leaves nothing half-written, and a non-empty `--out` is never replaced without
`--force`. Merged exports are verified by reloading them and comparing logits on a fixed probe
against the model they came from (adapter applied).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ..data.tokenizer import copy_tokenizer_files
from ..errors import UserError
from ..model.checkpoint import load_model, save_model
from ..model.gemma3 import Gemma3
from .inference import apply_adapter, load_with_adapter, resolve_run

# Gemma 3's chat template (what the -it checkpoints ship), for folders that lack one.
CHAT_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = "
    "messages[0]['content'] + '\n\n' if messages[0]['content'] is string else "
    "messages[0]['content'][0]['text'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    '{%- else -%}{%- set first_user_prefix = "" -%}{%- set loop_messages = messages -%}{%- endif -%}'
    "{%- for message in loop_messages -%}{%- if message['role'] == 'assistant' -%}{%- set role = "
    "\"model\" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + "
    "role + '\n' + (first_user_prefix if loop.first else \"\") }}{%- if message['content'] is string "
    "-%}{{ message['content'] | trim }}{%- else -%}{%- for item in message['content'] -%}{%- if "
    "item['type'] == 'image' -%}{{ '<start_of_image>' }}{%- elif item['type'] == 'text' -%}{{ "
    "item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _staging(out: Path, force: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"--out {out}: exists and is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    tmp.chmod(0o755)
    tmp.rename(out)


def copy_tokenizer(src: Path, dest: Path) -> None:
    copy_tokenizer_files(src, dest)
    cfg_file = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    if not cfg.get("chat_template") and not (dest / "chat_template.jinja").is_file():
        (dest / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def probe_ids(model: Gemma3, n: int = 24) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A fixed probe: ids (with one image block on vision models) and pixels."""
    c = model.config
    g = torch.Generator().manual_seed(1234)
    hi = min(c.vocab_size, 1000)
    if not c.is_multimodal:
        return torch.randint(4, hi, (1, n), generator=g), None
    m = c.mm_tokens_per_image
    ids = torch.randint(4, hi, (1, n + m), generator=g)
    ids[ids == c.image_token_id] = 5
    ids[0, 4 : 4 + m] = c.image_token_id
    s = c.vision.image_size
    return ids, torch.rand(1, 3, s, s, generator=g) * 2 - 1


def _logits(model: Gemma3, ids, pixels) -> torch.Tensor:
    with torch.no_grad():
        dtype = next(model.parameters()).dtype
        return model(ids, pixel_values=None if pixels is None else pixels.to(dtype)).logits.float()


def verify(reference: Gemma3, folder: Path, dtype: torch.dtype) -> float:
    """Reload `folder` and compare logits with `reference` (in the export dtype); raise on mismatch."""
    ids, pixels = probe_ids(reference)
    want = _logits(reference.to(dtype), ids, pixels)
    got = _logits(load_model(folder, dtype=dtype).eval(), ids, pixels)
    diff = (got - want).abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 0.05 * max(1.0, want.abs().max().item())
    if not diff <= tol:
        raise UserError(
            f"export verification failed: reloaded logits differ by {diff:.3g} (> {tol:.3g}); nothing written"
        )
    return diff


def _dequantize_like_qlora(model: Gemma3) -> None:
    """QLoRA trained against NF4-rounded weights: round the base the same way before merging."""
    import bitsandbytes.functional as bnbf

    for layer in model.text_model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child in parent.children():
                if isinstance(child, torch.nn.Linear):
                    w = child.weight.data.float()
                    q, state = bnbf.quantize_4bit(w, quant_type="nf4")
                    child.weight.data = bnbf.dequantize_4bit(q, state).to(child.weight.dtype)


def merged_model(src: Path, checkpoint: int | None = None) -> tuple[Gemma3, Path, Path | None, str]:
    """(model with the adapter folded in, base folder, adapter folder, method)."""
    base, adapter = resolve_run(src)
    method = "plain"
    if adapter is not None and checkpoint is not None:
        adapter = src / f"checkpoint-{checkpoint}"
        if not adapter.is_dir():
            raise UserError(f"--checkpoint {checkpoint}: {adapter} does not exist")
    if (src / "recipe.yaml").is_file():
        import yaml

        method = yaml.safe_load((src / "recipe.yaml").read_text()).get("method", "lora")
    if method == "qlora":
        model = load_model(base, dtype=torch.float32)
        _dequantize_like_qlora(model)
        model = apply_adapter(model, adapter)
    else:
        model = load_with_adapter(base, adapter, dtype=torch.float32)
    return model.eval(), base, adapter, method


def export_merged(
    src: Path,
    out: Path,
    dtype: str = "bfloat16",
    checkpoint: int | None = None,
    force: bool = False,
) -> Path:
    model, base, _, method = merged_model(src, checkpoint)
    tmp = _staging(out, force)
    try:
        torch_dtype = DTYPES[dtype]
        save_model(model, tmp, dtype=torch_dtype)
        # Keep the original config.json (vision config and all), with the new dtype.
        original = json.loads((base / "config.json").read_text())
        original["dtype"] = dtype
        original.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(original, indent=2) + "\n")
        copy_tokenizer(base, tmp)
        diff = verify(model, tmp, torch_dtype)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"verified: reloaded logits within {diff:.2e} of the merged model ({method})",
        file=sys.stderr,
    )
    return out


def export_adapter(
    src: Path, out: Path, checkpoint: int | None = None, force: bool = False, for_vllm: bool = False
) -> Path:
    """The peft adapter, loadable with peft onto transformers' Gemma 3 (our module names are
    transformers' own, so nothing is renamed)."""
    base, adapter = resolve_run(src)
    if adapter is None:
        raise UserError(f"{src}: has no adapter (a full SFT run or a plain model); use --merge")
    if checkpoint is not None:
        adapter = src / f"checkpoint-{checkpoint}"
    if (adapter / "projector.safetensors").is_file() and not (
        adapter / "adapter_config.json"
    ).is_file():
        raise UserError(f"{src}: a projector-only run has no LoRA adapter; use --merge")
    tmp = _staging(out, force)
    try:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(adapter / name, tmp / name)
        cfg = json.loads((tmp / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(base)
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        copy_tokenizer(base, tmp)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if cfg.get("modules_to_save"):
        print("note: the adapter carries the trained projector (modules_to_save)", file=sys.stderr)
    return out


def export_gguf(
    src: Path,
    out: Path,
    gguf_dtype: str = "f16",
    checkpoint: int | None = None,
    force: bool = False,
) -> Path:
    """Merge, write GGUF to a temporary file, read it back and compare every tensor, rename."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from .gguf_export import hf_to_gguf_name, write_gguf

    model, base, _, _ = merged_model(src, checkpoint)
    if out.suffix != ".gguf":
        raise UserError(f"--out {out}: a GGUF export is one file; name it *.gguf")
    if out.exists() and not force:
        raise UserError(f"--out {out}: exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    import os

    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_gguf(model, base, tmp, gguf_dtype)
        reader = GGUFReader(str(tmp))
        written = {t.name: t for t in reader.tensors}
        tol = {"f32": 1e-6, "f16": 2e-3, "bf16": 1e-2}[gguf_dtype]
        for key, ref in model.text_model.state_dict().items():
            gname, is_norm = hf_to_gguf_name("model." + key)
            t = written[gname]
            got = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
            want = ref.float() + (1.0 if is_norm else 0.0)
            err = (
                (got.reshape(want.shape) - want).abs().max() / want.abs().max().clamp(min=1e-6)
            ).item()
            if err > tol:
                raise UserError(f"GGUF verification failed on {gname}: relative error {err:.3g}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if model.config.is_multimodal:
        print(
            "note: the GGUF holds the text model only; vision weights are not in it",
            file=sys.stderr,
        )
    return out
