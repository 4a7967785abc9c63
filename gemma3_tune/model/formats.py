"""What a GGUF export can store, in one table: the CLI's choices (--gguf-dtype, --quantize), the
recipe's `qat.format`, the GGUF writer's file types and block formats, llama.cpp's quantizer
types and the export's read-back tolerances all read `GGUF_TYPES`. No torch here: the recipe
schema and the CLI's parser import it before anything heavy."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GgufType:
    """One way a GGUF export can store the text model's matrices."""

    name: str  # as the CLI (--gguf-dtype / --quantize) and the recipe (qat.format) spell it
    file_type: str  # gguf.LlamaFileType member written as general.file_type
    tolerance: float  # read-back check: max |stored - ours| / max |ours| (blocks: bitwise)
    blocks: bool = False  # a block format written here and trainable by QAT (fake_quantize)
    llama_ftype: str | None = None  # K-quants: llama.cpp's quantizer (llama_cpp.LLAMA_FTYPE_*)


GGUF_TYPES = {
    t.name: t
    for t in (
        GgufType("f32", "ALL_F32", 1e-6),
        GgufType("f16", "MOSTLY_F16", 2e-3),
        GgufType("bf16", "MOSTLY_BF16", 1e-2),
        # block formats: their blocks are compared bitwise; the tolerance is for what a block
        # export stores otherwise (norms in f32; q8_0: half a step, 1/127 of a block's largest)
        GgufType("q4_0", "MOSTLY_Q4_0", 1e-6, blocks=True),
        GgufType("q5_0", "MOSTLY_Q5_0", 1e-6, blocks=True),
        GgufType("q8_0", "MOSTLY_Q8_0", 5e-3, blocks=True),
        # K-quants mix types (a 640-wide matrix falls back to Q5_0 / Q8_0 blocks), bounded by
        # their coarsest: Q4_0's clipped extreme is off by 1/8 of the block's largest value.
        GgufType("q6_k", "MOSTLY_Q6_K", 2e-2, llama_ftype="LLAMA_FTYPE_MOSTLY_Q6_K"),
        GgufType("q5_k_m", "MOSTLY_Q5_K_M", 7e-2, llama_ftype="LLAMA_FTYPE_MOSTLY_Q5_K_M"),
        GgufType("q4_k_m", "MOSTLY_Q4_K_M", 0.13, llama_ftype="LLAMA_FTYPE_MOSTLY_Q4_K_M"),
    )
}
FORMATS = tuple(n for n, t in GGUF_TYPES.items() if t.blocks)  # q4_0, q5_0, q8_0
K_QUANTS = tuple(n for n, t in GGUF_TYPES.items() if t.llama_ftype)
FLOATS = ("f16", "bf16", "f32")  # --gguf-dtype
