"""`gemma3-tune export`: merged HF folders, peft adapters, GGUF files.

Every export is written to a temporary folder next to `--out`, verified, then renamed into
place: a crash leaves nothing half-written, and a non-empty `--out` is never replaced without
`--force`. Merged exports are verified by reloading them and comparing logits on a fixed probe
against the model they came from (adapter applied).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..data.template import ensure_chat_template
from ..data.tokenizer import copy_tokenizer_files
from ..errors import UserError
from ..model.checkpoint import load_model, save_model
from ..model.formats import GGUF_TYPES, K_QUANTS
from ..model.gemma3 import Gemma3
from ..outputs import refuse_existing, refuse_existing_file, staged_dir, staged_file
from ..train.runs import apply_adapter, load_with_adapter, recipe_base, resolve_run, run_method

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def copy_tokenizer(src: Path, dest: Path) -> None:
    copy_tokenizer_files(src, dest)
    ensure_chat_template(dest)


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


def checkpoint_dir(run: Path, step: int) -> Path:
    """checkpoint-N of a run, refused unless it was completely written."""
    from ..train.checkpoints import checkpoints, is_complete, verify_pickles

    ckpt = run / f"checkpoint-{step}"
    if not ckpt.is_dir():
        have = [p.name.removeprefix("checkpoint-") for p in checkpoints(run) if is_complete(p)]
        listed = f"complete ones: {', '.join(have)}" if have else "the run has no complete ones"
        raise UserError(f"--checkpoint {step}: {ckpt} does not exist; {listed}")
    if not is_complete(ckpt):
        raise UserError(
            f"--checkpoint {step}: {ckpt} was not completely written (the run was killed while"
            " saving it); choose another checkpoint"
        )
    verify_pickles(ckpt)  # DeepSpeed's zero_to_fp32 unpickles without weights_only
    return ckpt


def full_checkpoint_model(run: Path, ckpt: Path) -> Gemma3:
    """The weights of a full-SFT checkpoint, on CPU, whatever wrote it: DeepSpeed ZeRO
    partitions (the fp32 master weights, gathered by DeepSpeed's zero_to_fp32, no GPU needed),
    or the Trainer's model.safetensors."""
    from ..model.checkpoint import read_config

    model = Gemma3(read_config(recipe_base(run)))
    latest = ckpt / "latest"
    if latest.is_file() and (ckpt / latest.read_text().strip()).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    elif (ckpt / "model.safetensors").is_file():
        state = load_file(str(ckpt / "model.safetensors"))
    else:
        raise UserError(f"{ckpt}: no model weights (model.safetensors or DeepSpeed ZeRO states)")
    state = {k.removeprefix("module."): v.float() for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = [k for k in missing if "vision_tower" not in k]
    if unexpected or frozen:
        raise UserError(
            f"{ckpt}: its weights do not fit the model (missing {frozen[:3]},"
            f" unexpected {unexpected[:3]})"
        )
    if missing:  # only the frozen tower, which ZeRO does not save as trained state: the base's
        tower = load_model(recipe_base(run), dtype=torch.float32).vision_tower
        model.model.vision_tower.load_state_dict(tower.state_dict())
    return model.float()


def merged_model(src: Path, checkpoint: int | None = None) -> tuple[Gemma3, Path, Path | None, str]:
    """(model with the adapter folded in, base folder, adapter folder, method)."""
    if checkpoint is not None and run_method(src) == "full":  # model/ may not exist yet
        model = full_checkpoint_model(src, checkpoint_dir(src, checkpoint))
        return model.eval(), recipe_base(src), None, "full"
    base, adapter = resolve_run(src)
    method = run_method(src) or "plain"
    if adapter is not None and checkpoint is not None:
        adapter = checkpoint_dir(src, checkpoint)
    if method == "qlora":  # merged onto the very NF4 base the run trained against
        from ..train.qlora import dequantize_like_run

        model = load_model(base, dtype=torch.float32)
        dequantize_like_run(model, src)
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
    refuse_existing(out, force)  # before the (slow) merge
    model, base, _, method = merged_model(src, checkpoint)
    with staged_dir(out, force) as tmp:
        torch_dtype = DTYPES[dtype]
        save_model(model, tmp, dtype=torch_dtype)
        # Keep the original config.json (vision config and all), with the new dtype.
        original = json.loads((base / "config.json").read_text())
        original["dtype"] = dtype
        original.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(original, indent=2) + "\n")
        copy_tokenizer(base, tmp)  # and, for a vision model, the processor files it lacks
        diff = verify(model, tmp, torch_dtype)
    print(
        f"verified: reloaded logits within {diff:.2e} of the merged model ({method})",
        file=sys.stderr,
    )
    return out


def export_adapter(
    src: Path, out: Path, checkpoint: int | None = None, force: bool = False, for_vllm: bool = False
) -> Path:
    """The peft adapter. As trained, it loads with peft onto transformers' Gemma 3 (our module
    names are transformers' own), by `peft.AutoPeftModelForCausalLM.from_pretrained(out)` too
    (adapters.portable_config). `for_vllm` renames it for vLLM (see vllm_adapter)."""
    from ..train.adapters import portable_config, portable_weights

    base, adapter = resolve_run(src)
    if adapter is None:
        raise UserError(f"{src}: has no adapter (a full SFT run or a plain model); use --merge")
    if checkpoint is not None:
        adapter = checkpoint_dir(src, checkpoint)
    if (adapter / "projector.safetensors").is_file() and not (
        adapter / "adapter_config.json"
    ).is_file():
        raise UserError(f"{src}: a projector-only run has no LoRA adapter; use --merge")
    refuse_existing(out, force)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    if for_vllm:
        cfg, weights = vllm_adapter(cfg, weights, src)
    cfg = portable_config(cfg, base)  # loads with AutoPeftModelForCausalLM (runs of any age)
    weights = portable_weights(weights)
    with staged_dir(out, force) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file(weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        copy_tokenizer(base, tmp)
    if cfg.get("modules_to_save"):
        print(
            f"note: the adapter carries {_trained_modules(cfg)} (modules_to_save)", file=sys.stderr
        )
    return out


# vLLM's Gemma 3 names its submodules as the original checkpoints did: the multimodal model's
# decoder is `language_model.model.*` (transformers 5 in memory: `model.language_model.*`).
# Text-only Gemma 3 (270M, 1B) is `model.*` in both.
VLLM_PREFIX = {"model.language_model.": "language_model.model."}
VLLM_MAX_DEFAULT_RANK = 16  # vLLM's default --max-lora-rank


# modules_to_save entry -> (what it is, the recipe key that trained it)
_SAVED_MODULES = {
    "multi_modal_projector": ("the trained multimodal projector", "train_projector"),
    "embed_tokens": ("the trained embedding (tied LM head)", "train_embeddings"),
}


def _trained_modules(cfg: dict) -> str:
    """An adapter's modules_to_save, in words."""
    mods = cfg.get("modules_to_save") or []
    return " and ".join(_SAVED_MODULES.get(m, (m,))[0] for m in mods)


def vllm_adapter(cfg: dict, weights: dict, src: Path) -> tuple[dict, dict]:
    """Rename an adapter's modules to vLLM's Gemma 3 names and refuse what vLLM's LoRA cannot
    apply: a trained projector or embedding (modules_to_save) and DoRA."""
    if mods := cfg.get("modules_to_save"):
        keys = " / ".join(_SAVED_MODULES[m][1] for m in mods if m in _SAVED_MODULES)
        raise UserError(
            f"{src}: the adapter carries {_trained_modules(cfg)}, which vLLM's LoRA cannot load;"
            f" export --merge (or --format gguf) instead, or train with {keys}: false"
        )
    if cfg.get("use_dora"):
        raise UserError(f"{src}: vLLM does not serve DoRA adapters; export --merge instead")
    renamed = {}
    for key, t in weights.items():
        inner = key.removeprefix("base_model.model.")
        for old, new in VLLM_PREFIX.items():
            if inner.startswith(old):
                inner = new + inner[len(old) :]
        renamed["base_model.model." + inner] = t
    # vLLM matches target_modules by module-name suffix; a regex string is not understood.
    modules = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in renamed})
    cfg = {**cfg, "target_modules": modules}
    if cfg.get("r", 0) > VLLM_MAX_DEFAULT_RANK:
        print(
            f"note: LoRA rank {cfg['r']} > {VLLM_MAX_DEFAULT_RANK}: start vLLM with"
            f" --max-lora-rank {cfg['r']}",
            file=sys.stderr,
        )
    return cfg, renamed


def _embedding_format(src: Path, quantize: str | None) -> str | None:
    """The tied embedding's type in a block-format export: a QAT run's own choice
    (`qat.embeddings`, what it trained against), else q8_0 (the embedding is also the LM head,
    the matrix a 4-bit file hurts most; llama.cpp's own q4_k_m keeps it at Q8_0 on the 270M)."""
    if quantize is None or quantize in K_QUANTS:
        return None
    q = _qat_section(src)
    if q is None:
        return "q8_0"
    if q.get("format") != quantize:
        print(
            f"warning: {src} trained for {q.get('format')} (qat.format); exporting {quantize}",
            file=sys.stderr,
        )
    emb = q.get("embeddings", "q8_0")
    return quantize if emb == "same" else emb


def _qat_section(src: Path) -> dict | None:
    if not (src / "recipe.yaml").is_file():
        return None
    import yaml

    return yaml.safe_load((src / "recipe.yaml").read_text()).get("qat")


def _llama_cpp(kind: str):
    """llama-cpp-python, or one line naming the extra that installs it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            f"--quantize {kind} runs llama.cpp's quantizer: pip install 'gemma3-tune[llamacpp]'"
            " (llama-cpp-python; it builds llama.cpp), or use q4_0, q5_0 or q8_0, which need"
            " nothing else"
        ) from None
    return llama_cpp


def _llama_quantize(src: Path, dest: Path, kind: str) -> None:
    """llama.cpp's `llama_model_quantize` (what `llama-quantize` runs), through llama-cpp-python."""
    llama_cpp = _llama_cpp(kind)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, GGUF_TYPES[kind].llama_ftype)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), params)
    if rc != 0:
        raise UserError(f"--quantize {kind}: llama.cpp's quantizer failed (return code {rc})")


def export_gguf(
    src: Path,
    out: Path,
    gguf_dtype: str = "f16",
    checkpoint: int | None = None,
    force: bool = False,
    quantize: str | None = None,
    ollama: bool = False,
) -> Path:
    """Merge and write GGUF: the text model at `out` and, for a vision model, the vision tower
    and projector at `mmproj-<out name>` beside it (llama.cpp's --mmproj file). Each is written
    to a temporary file, read back and compared tensor by tensor, then renamed. `quantize`:
    q4_0 / q5_0 / q8_0 store the text model's matrices in ggml blocks (written by the gguf
    package; the tied embedding in `_embedding_format`'s type), q4_k_m / q5_k_m / q6_k go
    through llama.cpp's own quantizer from an f16 file. The mmproj file keeps `gguf_dtype`
    (f16 by default) whatever the text format. `ollama`: a Modelfile beside them."""
    from .gguf_export import hf_to_gguf_name, write_gguf
    from .gguf_mmproj import mmproj_name, vision_tensors, write_mmproj
    from .ollama import MODELFILE, write_modelfile

    if out.suffix != ".gguf":
        raise UserError(f"--out {out}: a GGUF export is one file; name it *.gguf")
    mmproj = out.with_name(f"mmproj-{out.name}")
    modelfile = out.with_name(MODELFILE)
    for target in (out, mmproj) + ((modelfile,) if ollama else ()):  # before the (slow) merge
        refuse_existing_file(target, force)
    if quantize in K_QUANTS:
        _llama_cpp(quantize)  # one line now, not after the merge
    embeddings = _embedding_format(src, quantize)
    model, base, _, _ = merged_model(src, checkpoint)
    text = {"model." + k: v for k, v in model.text_model.state_dict().items()}
    with staged_file(out, force) as tmp:
        if quantize in K_QUANTS:
            f16 = tmp.with_name(tmp.name + ".f16")
            try:
                write_gguf(model, base, f16, "f16")
                _llama_quantize(f16, tmp, quantize)
            finally:
                f16.unlink(missing_ok=True)
        else:
            write_gguf(model, base, tmp, quantize or gguf_dtype, embeddings=embeddings)
        # llama.cpp's quantizer starts from the f16 file: its Q8_0 / Q5_0 fallback blocks are
        # of the f16-rounded weights, so only our own block files are checked bitwise
        exact = quantize not in K_QUANTS
        _verify_gguf(tmp, text, hf_to_gguf_name, quantize or gguf_dtype, exact)
    if model.config.is_multimodal:
        with staged_file(mmproj, force) as tmp:
            write_mmproj(model, tmp, gguf_dtype)
            blocks = model.config.vision.num_hidden_layers
            _verify_gguf(tmp, vision_tensors(model), lambda k: mmproj_name(k, blocks), gguf_dtype)
        print(f"wrote {mmproj} (vision tower + projector, for llama.cpp --mmproj)", file=sys.stderr)
    if ollama:
        write_modelfile(modelfile, out, mmproj if model.config.is_multimodal else None)
        print(f"wrote {modelfile} (ollama create NAME -f {modelfile})", file=sys.stderr)
    return out


def _verify_gguf(path: Path, tensors: dict, name_of, gguf_dtype: str, exact: bool = True) -> None:
    """Every tensor read back from `path` equals ours (norms stored as 1 + w): bitwise
    model/quants.py's fake quantization for Q4_0/Q5_0/Q8_0 blocks (what QAT trains against),
    within the rounding of its stored type otherwise."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    from ..model.quants import FORMATS as BLOCK_FORMATS
    from ..model.quants import fake_quantize

    written = {t.name: t for t in GGUFReader(str(path)).tensors}
    tol = GGUF_TYPES[gguf_dtype].tolerance  # q4_0 / q5_0 / q8_0 blocks: compared exactly
    for key, ref in tensors.items():
        gname, plus_one = name_of(key)
        t = written[gname]
        got = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        want = ref.float() + (1.0 if plus_one else 0.0)
        stored = t.tensor_type.name.lower()
        if exact and stored in BLOCK_FORMATS:  # exactly what fake quantization (QAT) computes
            if not torch.equal(got.reshape(want.shape), fake_quantize(want, stored)):
                raise UserError(f"GGUF verification failed on {gname}: not bitwise {stored}")
            continue
        scale = want.abs().max().clamp(min=1e-6)
        err = ((got.reshape(want.shape) - want).abs().max() / scale).item()
        if err > max(tol, 2e-3 if t.tensor_type == GGMLQuantizationType.F16 else 0.0):
            raise UserError(f"GGUF verification failed on {gname}: relative error {err:.3g}")
