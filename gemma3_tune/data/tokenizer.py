"""Tokenizers: a small SentencePiece model with Gemma's special tokens, for tiny test models.

Real checkpoints bring their own `tokenizer.model` / `tokenizer.json`; `init-model` trains a
tiny byte-fallback BPE here so that random tiny models have a working tokenizer too. It is
written in both formats: `tokenizer.model` (sentencepiece) and `tokenizer.json` (tokenizers,
through transformers' GemmaTokenizer so `AutoTokenizer` loads the folder).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, as in Gemma's tokenizer
GEMMA_USER_SYMBOLS = [
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

_WORDS = (
    "the a of to and in is it you that he was for on are with as I his they be at one have this "
    "from or had by hot word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound no "
    "most people my over know water than call first who may down side been now find user model "
    "name city date order price json answer question image red green blue"
).split()


def _corpus(seed: int = 0, lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))
        out.append(words + rng.choice([".", "?", "!", ",", ":"]))
    out += ['{"name": "x", "city": "y", "count": 12}'] * 30
    return out


def train_tiny_tokenizer(
    out_dir: str | Path, vocab_size: int = 512, seed: int = 0
) -> dict[str, int]:
    """Train and write a tiny Gemma-style tokenizer; returns the special-token ids."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(seed)),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=GEMMA_USER_SYMBOLS,
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        minloglevel=2,
    )  # fmt: skip
    model_file = out_dir / "tokenizer.model"
    model_file.write_bytes(buf.getvalue())
    _write_tokenizer_json(model_file, out_dir)
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    return {p: sp.piece_to_id(p) for p in GEMMA_SPECIALS + GEMMA_USER_SYMBOLS}


def _write_tokenizer_json(model_file: Path, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json from the sentencepiece model (same ids)."""
    from tokenizers.models import BPE
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    kw = SentencePieceExtractor(str(model_file)).extract(BPE)
    tok = GemmaTokenizer(
        vocab=kw["vocab"],
        merges=kw["merges"],
        additional_special_tokens=kw["additional_special_tokens"],
    )
    tok.save_pretrained(str(out_dir))
