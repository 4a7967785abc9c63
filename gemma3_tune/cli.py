"""`gemma3-tune`: the command line. Each verb is a thin wrapper over a library function.

Mistakes the user can fix (bad files, bad keys) print one line, `error: ...`, and exit 2:
never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Only light imports here: `--help`, a recipe typo or a schema error must answer in about a
# second, so torch, transformers and the trainer load inside the commands that need them.
from .errors import CheckpointError, UserError
from .model.formats import FLOATS, FORMATS, K_QUANTS


def cmd_init_model(args: argparse.Namespace) -> None:
    from .export.init_model import init_model

    out = init_model(args.preset, args.out, seed=args.seed, force=args.force)
    print(f"wrote random {args.preset} model to {out}", file=sys.stderr)


def cmd_import_gguf(args: argparse.Namespace) -> None:
    from .convert.gguf_import import import_gguf

    out = import_gguf(args.gguf, args.out, force=args.force)
    print(f"wrote {out}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:

    from .train.recipe import load_recipe, model_dir, output_dir

    recipe = load_recipe(args.recipe, args.overrides)
    output_dir(recipe)  # refuse a taken output_dir or a missing model before the slow imports
    if not recipe.model.path.startswith("gguf:"):
        model_dir(recipe)
    from .train.refusals import refuse

    refuse(recipe)  # combinations we do not train, one line each, before anything heavy
    from .train.trainer import train

    out = train(recipe)
    print(f"run finished: {out}", file=sys.stderr)
    if recipe.eval.metric and int(os.environ.get("RANK", "0")) == 0:
        from .eval.after_training import score_run

        score_run(out, recipe)  # eval.json and the model card (eval/ is not train/'s to call)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import hf_export

    if args.for_ == "vllm" and not args.adapter_only:
        raise UserError(
            "--for vllm applies to --adapter-only; a merged export (--merge) loads in vLLM as is"
        )
    if args.ollama and args.format != "gguf":
        raise UserError("--ollama applies to --format gguf (Ollama imports GGUF files)")
    if args.quantize and args.format != "gguf":
        raise UserError("--quantize applies to --format gguf; HF folders keep --dtype weights")
    if args.format == "gguf":
        out = hf_export.export_gguf(
            args.src,
            args.out,
            args.gguf_dtype,
            args.checkpoint,
            args.force,
            args.quantize,
            args.ollama,
        )
    elif args.adapter_only:
        out = hf_export.export_adapter(
            args.src, args.out, args.checkpoint, args.force, args.for_ == "vllm"
        )
    else:
        out = hf_export.export_merged(args.src, args.out, args.dtype, args.checkpoint, args.force)
    print(f"exported {out}", file=sys.stderr)
    return 0


def _read_tools(path: Path | None) -> list[dict]:
    """`--tools FILE.json`: a JSON list of OpenAI-style function schemas (as in training data)."""
    import json

    from .data.tools import ToolFormatError, function_schema

    if path is None:
        return []
    if not path.is_file():
        raise UserError(f"--tools {path}: no such file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return [function_schema(t) for t in (raw if isinstance(raw, list) else [raw])]
    except json.JSONDecodeError as e:
        raise UserError(f"--tools {path}:{e.lineno}: not JSON ({e.msg})") from None
    except ToolFormatError as e:
        raise UserError(f"--tools {path}: {e}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.report_cache:  # argument mistakes answer before torch loads
        if args.model is None:
            raise UserError("generate: give a MODEL folder or run directory")
        if args.prompt is None and not args.interactive:
            raise UserError("generate: --prompt is required (or use --interactive)")
        if not args.model.exists():
            raise UserError(f"generate: {args.model}: no such model folder or run directory")
        for image in args.image or []:
            if not Path(image).is_file():
                raise UserError(f"--image {image}: no such file")
        args.tools = _read_tools(args.tools)
    from .export.generate_cli import run

    return run(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.command import run

    return run(args)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from .train.data_check import prepare_only

    return prepare_only(args.recipe, args.overrides)


def cmd_data_check(args: argparse.Namespace) -> int:
    from .train.data_check import run

    return run(args.recipe, args.overrides, args.json)


def recipe_help() -> str:
    from .train.recipe import describe_keys

    return "\n".join(f"  {key:<40} {default:<18} {doc}" for key, default, doc in describe_keys())


def _add_init_model(sub: argparse._SubParsersAction) -> None:
    """`init-model`: random weights in HF layout with a tokenizer."""
    s = sub.add_parser(
        "init-model", help="write a random-weight model (HF layout) with a tokenizer"
    )
    s.add_argument("--preset", required=True, help="270m, 1b, 4b, 12b, 27b, tiny, tiny-vision")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    s.set_defaults(func=cmd_init_model)


def _add_import_gguf(sub: argparse._SubParsersAction) -> None:
    """`import-gguf`: a GGUF file to an HF-format folder."""
    s = sub.add_parser("import-gguf", help="convert a Gemma 3 GGUF file to an HF-format folder")
    s.add_argument("gguf", type=Path)
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    s.set_defaults(func=cmd_import_gguf)


def _add_train(sub: argparse._SubParsersAction) -> None:
    """`train RECIPE [dotted.key=value ...]`; its --help lists every recipe key."""
    s = sub.add_parser(
        "train",
        help="fine-tune from a recipe YAML",
        description="Fine-tune Gemma 3 from a recipe. Keys (dotted.key=value overrides):\n\n"
        + recipe_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. training.lr=1e-4")
    s.set_defaults(func=cmd_train)


def _add_export(sub: argparse._SubParsersAction) -> None:
    """`export SRC --out DIR`: a merged HF folder, a peft adapter or a GGUF file."""
    s = sub.add_parser("export", help="merged HF folder, peft adapter, or GGUF from a run or model")
    s.add_argument("src", type=Path, help="a run directory or an HF model folder")
    s.add_argument("--out", required=True, type=Path)
    mode = s.add_mutually_exclusive_group()
    mode.add_argument(
        "--merge", action="store_true", help="fold the adapter into the base (default)"
    )
    mode.add_argument("--adapter-only", action="store_true", help="a peft adapter folder")
    s.add_argument("--format", choices=["hf", "gguf"], default="hf")
    s.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="merged HF weights (default: %(default)s)",
    )
    s.add_argument(
        "--gguf-dtype",
        choices=FLOATS,
        default="f16",
        help="GGUF tensors (default: %(default)s)",
    )
    s.add_argument(
        "--quantize",
        choices=[*FORMATS, *K_QUANTS],
        default=None,
        help="GGUF: store the text model's matrices quantized (q4_0/q5_0/q8_0: the gguf package,"
        " what qat: trains; K-quants: llama.cpp's own quantizer, the [llamacpp] extra)",
    )
    s.add_argument(
        "--ollama",
        action="store_true",
        help="GGUF: write an Ollama Modelfile beside it (ollama create NAME -f Modelfile)",
    )
    s.add_argument(
        "--checkpoint",
        type=int,
        default=None,
        help="export checkpoint-N instead of the final adapter",
    )
    s.add_argument(
        "--for", dest="for_", choices=["peft", "vllm"], default="peft", help="adapter consumer"
    )
    s.add_argument("--force", action="store_true", help="replace a non-empty --out")
    s.set_defaults(func=cmd_export)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    """`generate MODEL --prompt ...`: chat with a model, an export or a run."""
    s = sub.add_parser(
        "generate", help="chat with a model, an export or a run (KV cache, streamed)"
    )
    s.add_argument("model", type=Path, nargs="?", help="HF folder or run directory")
    s.add_argument("--adapter", type=Path, default=None, help="a peft adapter to apply")
    s.add_argument("--prompt", default=None)
    s.add_argument(
        "--image", action="append", default=[], help="an image for the prompt (repeatable)"
    )
    s.add_argument("--system", default=None)
    s.add_argument(
        "--tools",
        type=Path,
        default=None,
        help="JSON list of function schemas the model may call; it stops after a call",
    )
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument(
        "--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
        help="auto: a run's own dtype; a model folder's bfloat16 on CUDA and on CPUs with"
        " AVX512-BF16 or AMX, else float32",
    )  # fmt: skip
    s.add_argument("--interactive", action="store_true", help="a chat loop")
    s.add_argument("--no-cache", action="store_true", help="recompute every step (reference path)")
    s.add_argument(
        "--report-cache", action="store_true", help="print KV-cache sizes (4B, 27B; 8K-128K)"
    )
    s.set_defaults(func=cmd_generate)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    """`eval TARGET... --data FILE`: score targets side by side."""
    s = sub.add_parser(
        "eval",
        help="score runs, models, adapters or GGUF files on held-out chats (or preference"
        " pairs, or prompts with reward functions), side by side",
    )
    s.add_argument(
        "targets", nargs="+", metavar="TARGET",
        help="run directory, HF folder, gguf:gemma3-270m or a .gguf file",
    )  # fmt: skip
    s.add_argument(
        "--data", required=True,
        help="chats (JSONL, JSON, Parquet, save_to_disk); for --metric loss also raw text"
        " ({text}, .txt) and {prompt, completion} rows; for --metric preference, TRL's"
        " {prompt, chosen, rejected} pairs; for --metric reward, TRL's prompt-only rows",
    )  # fmt: skip
    s.add_argument(
        "--metric", action="append", default=None,
        help="exact (default), json, contains or loss; repeatable. preference (on pairs, on its"
        " own): the share of pairs whose chosen reply gets the higher summed log-prob, and the"
        " mean margin in nats. reward (on prompt-only rows, on its own, with --reward): each"
        " function's mean over the completions, the total, and best of K with --samples K",
    )  # fmt: skip
    s.add_argument(
        "--reward", action="append", default=None, metavar="SPEC",
        help="--metric reward: a reward function, as rl.rewards names it (json_valid,"
        " json_equal:COLUMN, path/file.py:function, module:function); repeatable",
    )  # fmt: skip
    s.add_argument(
        "--samples", type=int, default=None, metavar="K",
        help="--metric reward: K sampled completions per prompt (default: one, greedy)",
    )  # fmt: skip
    s.add_argument("--temperature", type=float, default=None, help="with --samples; default 1.0")
    s.add_argument("--seed", type=int, default=None, help="with --samples; default 0")
    s.add_argument("--adapter", type=Path, default=None, help="a peft adapter for HF folders")
    s.add_argument(
        "--backend", choices=["ours", "llama.cpp"], default="ours",
        help="ours: GGUFs de-quantized into our model; llama.cpp: real llama.cpp (llama-cpp-python)",
    )  # fmt: skip
    s.add_argument("--limit", type=int, default=None, help="the first N samples")
    s.add_argument(
        "--max-seq-len", type=int, default=2048,
        help="--metric loss on raw text: a longer document is scored in windows of this many"
        " tokens, as training cuts it (use the recipe's data.max_seq_len)",
    )  # fmt: skip
    s.add_argument(
        "--max-new-tokens", type=int, default=None,
        help="longest reply; default: twice the longest reference reply in tokens, at least 32"
        " (a base model never ends its turn); --metric reward: 256 (TRL's)",
    )  # fmt: skip
    s.add_argument(
        "--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
        help="one for every target; auto: the dtype the first run given trained in, else"
        " bfloat16 on CUDA and on CPUs with AVX512-BF16 or AMX, float32 elsewhere",
    )  # fmt: skip
    s.add_argument(
        "--batch-size", type=int, default=16,
        help="prompts decoded together (preference: pairs packed into one forward)",
    )  # fmt: skip
    s.add_argument("--out", type=Path, default=None, help="predictions.jsonl and summary.json")
    s.add_argument("--force", action="store_true", help="replace a non-empty --out")
    s.add_argument("--json", action="store_true", help="end with one JSON line of scores")
    s.set_defaults(func=cmd_eval)


def _add_data(sub: argparse._SubParsersAction) -> None:
    """`data check` and `data prepare`: validate, or tokenize and pack into the cache."""
    s = sub.add_parser("data", help="data tools")
    dsub = s.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser(
        "check", help="validate every sample; print counts, packing, one rendered sample"
    )
    c.add_argument("recipe")
    c.add_argument("overrides", nargs="*", help="dotted.key=value")
    c.add_argument("--json", action="store_true", help="end with one JSON line of counts")
    c.set_defaults(func=cmd_data_check)
    c = dsub.add_parser(
        "prepare", help="tokenize and pack into the data cache now (later runs start from it)"
    )
    c.add_argument("recipe")
    c.add_argument("overrides", nargs="*", help="dotted.key=value")
    c.set_defaults(func=cmd_data_prepare)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gemma3-tune", description="Fine-tune Gemma 3 with LoRA, QLoRA or full SFT."
    )
    sub = p.add_subparsers(dest="command", required=True)
    _add_init_model(sub)
    _add_import_gguf(sub)
    _add_train(sub)
    _add_export(sub)
    _add_generate(sub)
    _add_eval(sub)
    _add_data(sub)
    return p


def quiet_libraries() -> None:
    """peft imports bitsandbytes whenever it is installed; on CPUs with AVX512-BF16 its CPU
    backend then asks the kernels hub for an optional 4-bit kernel on import, and both log a
    warning on every command ("Failed to load CPU gemm_4bit_forward ...", "Skipping publisher
    trust check ..."). Our NF4 layers never use that kernel (train/qlora.py), so only their
    errors are shown."""
    import logging

    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    # We never contact a model hub: no downloads, no telemetry.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except (UserError, CheckpointError) as e:
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(e):
            raise
        print(f"error: {out_of_memory_message(e)}", file=sys.stderr)
        return 3
    return rc or 0


_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA OOM (torch.OutOfMemoryError), CPU allocator failures, Python MemoryError."""
    return isinstance(e, MemoryError) or any(t in str(e).lower() for t in _OOM_TEXT)


def out_of_memory_message(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return (
        f"out of memory ({first}); lower training.micro_batch_size or data.max_seq_len, set"
        " training.gradient_checkpointing=true, use method: qlora, or deepspeed: zero3_offload"
    )


if __name__ == "__main__":
    sys.exit(main())
