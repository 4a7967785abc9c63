"""Text the checkpoint writes itself: QAT's data-free training text (`qat.data: [self]`).

The Gemma 3 report trains QAT on data "adapted to the pretraining and post-training
distributions". A user with no such data at hand can let the unquantized checkpoint write it:
`samples` texts sampled from `<bos>` at `temperature` (1: the model's own distribution), each
at most `max_new_tokens` tokens, ending at `<eos>`. Distilled on every position
(`qat.target: teacher`), they ask the quantized model to match the checkpoint on the text the
checkpoint itself finds likely, which is what a perplexity measures.

Each text draws from a generator seeded by the run's seed and its index, so a fill that is
killed and resumed, or batched differently, writes the same texts. Progress is kept a batch at
a time in `samples.jsonl` (a torn last line is ignored); once every text exists, the training
file `self_text.jsonl` (`{"text"}` rows, read as raw text by data/documents.py) is written in
index order. A text that ends at once (an empty one) is counted and left out of it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from .tokenizer import Tokenizer

PROGRESS = "samples.jsonl"
FILE = "self_text.jsonl"


def text_seed(seed: int, index: int) -> int:
    """The seed of text `index`'s generator (63 bits): from the run's seed and the index."""
    return int(hashlib.sha256(f"self:{seed}:{index}".encode()).hexdigest()[:16], 16) >> 1


def done(folder: Path) -> dict[int, dict]:
    """index -> its progress line ({"index", "text", "tokens", "stopped"}); a torn last line
    (a write cut short) is skipped."""
    path = Path(folder) / PROGRESS
    if not path.is_file():
        return {}
    out = {}
    for raw in path.read_bytes().split(b"\n"):
        try:
            line = json.loads(raw)
            out[int(line["index"])] = line
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            continue
    return out


def sample_texts(
    model,
    tok: Tokenizer,
    folder: Path,
    *,
    samples: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 64,
) -> Path:
    """Sample every text not yet in `folder`'s progress file, then write the training file;
    returns its path. The model decodes 64 rows at a time through GRPO's sampler (one draw per
    row from its own generator by inverting the CDF: a multinomial per row took 41% of the
    time on a 2-core CPU)."""
    import torch

    from ..model.generate import generate_groups
    from ..progress import bar as progress_bar

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(samples) if i not in done(folder)]
    device = next(model.parameters()).device
    t0, tokens = time.perf_counter(), 0
    was_training = model.training
    model.eval()
    try:
        with progress_bar(len(todo), "self text", "text") as bar:
            for a in range(0, len(todo), batch_size):
                batch = todo[a : a + batch_size]
                gens = [
                    torch.Generator(device=device).manual_seed(text_seed(seed, i)) for i in batch
                ]
                ids, _ = generate_groups(  # one <bos> prompt, a row per text
                    model,
                    [[tok.bos_id]],
                    len(batch),
                    gens,
                    max_new_tokens=max_new_tokens,
                    stop_ids={tok.eos_id},
                    pad_id=tok.pad_id,
                    temperature=temperature,
                )
                ids = [t[:-1] if t and t[-1] == tok.eos_id else t for t in ids]
                _append(folder, batch, ids, tok, max_new_tokens)
                tokens += sum(map(len, ids))
                bar.update(len(batch))
                bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):,.0f} tokens/s")
    finally:
        model.train(was_training)
    return write_training_file(folder, samples)


def _append(folder: Path, indices: list[int], ids: list[list[int]], tok, cap: int) -> None:
    with open(folder / PROGRESS, "a", encoding="utf-8") as f:
        for i, t in zip(indices, ids, strict=True):
            line = {"index": i, "text": tok.decode(t), "tokens": len(t), "stopped": len(t) < cap}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
        f.flush()


def write_training_file(folder: Path, samples: int) -> Path:
    """`self_text.jsonl` from the progress file, texts in index order, and a line saying what
    it holds (how many ended at `<eos>`, how many were cut at max_new_tokens, how many empty)."""
    lines = done(folder)
    texts = [lines[i] for i in range(samples)]
    kept = [t for t in texts if t["text"].strip()]
    path = Path(folder) / FILE
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for t in kept:
            f.write(json.dumps({"text": t["text"]}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    cut = sum(not t["stopped"] for t in texts)
    tokens = sum(t["tokens"] for t in texts)
    print(
        f"self text: {len(kept)} texts, {tokens:,} tokens sampled ({cut} cut at max_new_tokens,"
        f" {len(texts) - len(kept)} empty and left out), in {path}",
        file=sys.stderr,
    )
    return path


def complete(folder: Path) -> bool:
    return (Path(folder) / FILE).is_file()
