"""`gemma3-tune generate`: only the reply goes to stdout (streamed); logs go to stderr."""

from __future__ import annotations

import sys
from pathlib import Path

from ..data.template import Turn, stop_at_call
from ..data.tokenizer import Tokenizer
from ..data.tools import START_RESP
from ..errors import UserError
from ..model.checkpoint import read_config
from ..model.config import preset
from ..model.generate import kv_cache_bytes
from ..train.runs import decode_dtype
from .inference import load_with_adapter, reply, resolve_run


def cache_table() -> str:
    """KV cache per sequence, bf16, for the Gemma 3 report's comparison (5:1 local:global)."""
    lines = [
        "| model | context | Gemma 3 (5 local : 1 global) | all global | saving |",
        "|---|---|---|---|---|",
    ]
    for name in ("4b", "27b"):
        c = preset(name)
        for ctx in (8192, 32768, 131072):
            ours, full = kv_cache_bytes(c, ctx), kv_cache_bytes(c, ctx, all_global=True)
            lines.append(
                f"| {name} | {ctx // 1024}K | {ours / 2**30:.2f} GiB | {full / 2**30:.2f} GiB | {1 - ours / full:.0%} |"
            )
    return "\n".join(lines)


def _held_back(text: str) -> int:
    """How many trailing characters could begin `<start_function_response>` (not shown yet)."""
    return next((k for k in range(len(START_RESP), 0, -1) if text.endswith(START_RESP[:k])), 0)


def _stream(model, tok, prompt, images, args, history=()) -> str:
    """Print the reply as it comes; a call ends at `<start_function_response>` (the token, or
    its text where the vocabulary lacks it), which is not printed."""
    ids: list[int] = []
    shown = ""
    for t in reply(
        model, tok, prompt, images, args.max_new_tokens, system=args.system, history=history,
        tools=getattr(args, "tools", None) or (),
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache,
    ):  # fmt: skip
        ids.append(t)
        text = tok.decode(ids)
        done = START_RESP in text
        text = stop_at_call(text)
        ready = text if done else text[: len(text) - _held_back(text)]
        if ready.startswith(shown):  # print only what is new (multi-byte characters arrive whole)
            sys.stdout.write(ready[len(shown) :])
            sys.stdout.flush()
            shown = ready
        if done:
            break
    sys.stdout.write("\n")
    sys.stdout.flush()
    return shown


def run(args) -> int:
    if args.report_cache:
        print(cache_table())
        return 0
    base, adapter = resolve_run(args.model)
    adapter = args.adapter or adapter
    if args.image and not read_config(base).is_multimodal:  # before the (slow) load
        raise UserError("--image given, but the model is text-only")
    dtype = decode_dtype(args.dtype, [Path(args.model)])  # auto: a run's own dtype
    print(f"loading {base}" + (f" + {adapter}" if adapter else ""), file=sys.stderr)
    model = load_with_adapter(base, adapter, dtype=dtype).eval()
    tok = Tokenizer(base)
    if not args.interactive:  # cli.cmd_generate checked that --prompt is given
        _stream(model, tok, args.prompt, args.image, args)
        return 0
    print("chat (empty line or Ctrl-D to quit)", file=sys.stderr)
    # The conversation so far (text); --image applies to the first question.
    history: list[Turn] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        images = args.image if not history else []
        answer = _stream(model, tok, line, images, args, history)
        history += [Turn("user", [line]), Turn("assistant", [answer])]
    return 0
