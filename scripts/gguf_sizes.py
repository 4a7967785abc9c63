"""Weight memory of each Gemma 3 size in each GGUF format, beside the report's Table 3.

    python scripts/gguf_sizes.py            # markdown table (BENCHMARKS.md, docs/qat-and-gguf.md)

Counts come from our presets (model/config.py), built on the meta device (no weights): the
text decoder's matrices, the tied embedding, norms, and for 4B+ the SigLIP tower and projector.
Bytes per weight from model/quants.py's bits_per_weight (ggml's block structs). Two 4-bit
columns: every matrix in Q4_0 (the report's "int4, blocks=32" with a 16-bit scale per block:
4.5 bits), and our `--quantize q4_0` file (the tied embedding in Q8_0, norms in f32; the
mmproj file, f16, holds the vision tower and projector). The report's own figures (GB, raw bf16
/ int4 blocks=32) are copied from its Table 3 for comparison; GB here is 10^9 bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemma3_tune.model.config import preset  # noqa: E402
from gemma3_tune.model.gemma3 import Gemma3  # noqa: E402
from gemma3_tune.model.quants import bits_per_weight  # noqa: E402

REPORT = {"1b": (2.0, 0.7), "4b": (8.0, 2.9), "12b": (24.0, 7.1), "27b": (54.0, 15.3)}


def counts(name: str) -> dict[str, int]:
    """Parameters by kind: matrices of the decoder, the embedding, 1-D (norms), vision."""
    with torch.device("meta"):
        model = Gemma3(preset(name))
    out = {"linear": 0, "embedding": 0, "vector": 0, "vision": 0}
    for key, p in model.named_parameters():
        if "vision_tower" in key or "multi_modal_projector" in key:
            out["vision"] += p.numel()
        elif "embed_tokens" in key:
            out["embedding"] += p.numel()
        elif p.dim() == 1:
            out["vector"] += p.numel()
        else:
            out["linear"] += p.numel()
    return out


def gb(n_weights: float, fmt: str) -> float:
    return n_weights * bits_per_weight(fmt) / 8 / 1e9


def table() -> str:
    rows = [
        "| size | parameters | bf16 | all Q4_0 (4.5 bits) | our q4_0 GGUF (+ f16 mmproj) |"
        " our q8_0 GGUF | report: raw bf16 / int4 blocks=32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("270m", "1b", "4b", "12b", "27b"):
        c = counts(name)
        total = sum(c.values())
        ours_q4 = gb(c["linear"], "q4_0") + gb(c["embedding"], "q8_0") + gb(c["vector"], "f32")
        ours_q8 = gb(c["linear"] + c["embedding"], "q8_0") + gb(c["vector"], "f32")
        mmproj = gb(c["vision"], "f16")
        extra = f" + {mmproj:.2f}" if c["vision"] else ""
        report = "{:.1f} / {:.1f}".format(*REPORT[name]) if name in REPORT else "-"
        rows.append(
            f"| {name} | {total / 1e9:.2f}B | {gb(total, 'bf16'):.2f} | {gb(total, 'q4_0'):.2f}"
            f" | {ours_q4:.2f}{extra} | {ours_q8:.2f}{extra} | {report} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
