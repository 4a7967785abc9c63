"""`gemma3-tune eval --backend llama.cpp`: a GGUF's replies from real llama.cpp
(llama-cpp-python), to the very prompt ids our renderer gives, decoded greedily to the same
stops: what llama.cpp, Ollama and LM Studio users get, side by side with the de-quantized
backend's score; and `--metric loss`, llama.cpp's own log-probabilities of the very token ids
our model is scored on (a quantized file's perplexity as its users' runtime computes it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import UserError


def require() -> None:
    """One line, before any model loads, when llama-cpp-python is missing."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise UserError(
            "eval --backend llama.cpp needs llama-cpp-python: pip install llama-cpp-python"
            " (it builds llama.cpp from source), or drop --backend to de-quantize the GGUF"
            " into our model"
        ) from None


def gguf_tokenizer(path: Path):
    """Our tokenizer for a GGUF's vocabulary (converted by transformers, as import-gguf does)."""
    from ..convert.gguf_import import _save_tokenizer
    from ..data.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory(prefix="gemma3-tune-tok-") as tmp:
        _save_tokenizer(Path(path), Path(tmp))
        return Tokenizer(tmp)


def replies(
    path: Path, prompts: list[list[int]], max_new_tokens: int, stops: set[int], bar
) -> list[list[int]]:
    """Greedy reply ids for each prompt (top_k 1, no repeat penalty), stopping at `stops`."""
    from llama_cpp import Llama

    longest = max(len(p) for p in prompts) + max_new_tokens
    llm = Llama(model_path=str(path), n_ctx=longest, n_threads=os.cpu_count() or 1, verbose=False)
    out = []
    for ids in prompts:
        llm.reset()
        got: list[int] = []
        for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            if t in stops or len(got) == max_new_tokens:
                break
            got.append(t)
        out.append(got)
        bar.update(1)
    return out


def token_loss(path: Path, documents: list[list], bar) -> tuple[list[float], list[int]]:
    """Per sample (its token documents, eval/loss.py's): the summed negative log-likelihood of
    its scored tokens (a label after the first position) under llama.cpp's logits, each
    document evaluated from an empty context, and their number."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    longest = max((len(d.input_ids) for docs in documents for d in docs), default=1)
    llm = Llama(
        model_path=str(path),
        n_ctx=longest,
        n_batch=min(longest, 512),
        logits_all=True,
        n_threads=os.cpu_count() or 1,
        verbose=False,
    )
    sums, counts = [], []
    for docs in documents:
        total, n = 0.0, 0
        for d in docs:
            ids, labels = np.asarray(d.input_ids), np.asarray(d.labels)
            at = np.nonzero(labels[1:] != -100)[0]  # positions t scoring ids[t + 1]
            if not len(at):
                continue
            llm.reset()
            llm.eval(d.input_ids)
            logits = torch.from_numpy(np.ascontiguousarray(llm.scores[at]))  # [k, V] fp32
            nll = torch.nn.functional.cross_entropy(
                logits, torch.from_numpy(ids[at + 1]), reduction="sum"
            )
            total += float(nll)
            n += len(at)
        sums.append(total)
        counts.append(n)
        bar.update(1)
    return sums, counts
