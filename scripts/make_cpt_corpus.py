"""Build the continued-pretraining example's corpus: the Python source of the transformers models
written in 2025 and 2026, from the transformers package installed here (a real corpus no one in
this project wrote, and one Gemma 3 cannot have memorised: its training data stops in August
2024, and each file's licence header dates it).

    data/cpt/train.jsonl    {"text": source, "model": name}, one model per row
    data/cpt/heldout.jsonl  other models, never trained on (whole files: eval --metric loss)

Each document is a model's `modeling_*.py` with the licence header and the "generated from
modular_*.py" banner removed (boilerplate every file repeats would flatter the loss). Models are
split by a hash of their name, so the split does not depend on the package's file order.
Deterministic for a given transformers version (written to data/cpt/SOURCE).

    python scripts/make_cpt_corpus.py [--heldout 8]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

YEARS = re.compile(r"Copyright 202[56]\b")
BANNER = re.compile(r"\A(\s*#[^\n]*\n)+")  # the leading comment block: licence, "generated" note


def _documents(root: Path) -> list[tuple[str, str]]:
    """(model, source) for every modeling file whose header dates it 2025 or later."""
    out = []
    for path in sorted(root.glob("*/modeling_*.py")):
        text = path.read_text(encoding="utf-8")
        if not YEARS.search(text[:2000]):
            continue
        body = BANNER.sub("", text).lstrip("\n")
        if len(body) > 2000:
            out.append((f"{path.parent.name}/{path.name}", body))
    return out


def _held_out(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def main(out: Path = Path("data/cpt"), heldout: int = 8) -> None:
    import transformers

    root = Path(transformers.__file__).parent / "models"
    docs = _documents(root)
    held = set(sorted((n for n, _ in docs), key=_held_out)[:heldout])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w") as tr, open(out / "heldout.jsonl", "w") as he:
        for name, body in docs:
            (he if name in held else tr).write(json.dumps({"text": body, "model": name}) + "\n")
    (out / "SOURCE").write_text(f"transformers {transformers.__version__}: {len(docs)} files\n")
    size = sum(len(b) for _, b in docs)
    print(f"wrote {len(docs) - len(held)} train and {len(held)} held-out documents"
          f" ({size / 1e6:.1f} MB) from transformers {transformers.__version__} to {out}")  # fmt: skip


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heldout", type=int, default=8)
    main(heldout=p.parse_args().heldout)
