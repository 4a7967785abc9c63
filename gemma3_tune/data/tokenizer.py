"""Tokenizers: a small SentencePiece model with Gemma's special tokens, for tiny test models.

Real checkpoints bring their own `tokenizer.model` / `tokenizer.json`; `init-model` trains a
tiny byte-fallback BPE here so that random tiny models have a working tokenizer too. It is
written in both formats: `tokenizer.model` (sentencepiece) and `tokenizer.json` (tokenizers,
through transformers' GemmaTokenizer so `AutoTokenizer` loads the folder).
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, as in Gemma's tokenizer
GEMMA_USER_SYMBOLS = [
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)


def copy_tokenizer_files(src: Path, dest: Path) -> None:
    """Copy a model folder's tokenizer (and processor/generation) files next to new weights;
    a vision model folder (`dest` has a multimodal config.json) also gets the processor files
    its source lacked (see write_processor_files)."""
    import shutil

    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dest / name)
    if (dest / "config.json").is_file():
        write_processor_files(dest)


# The named image tokens transformers' Gemma3Processor reads from the tokenizer
# (`tokenizer.boi_token`, ...), as the published Gemma 3 tokenizer_config.json declares them.
MM_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}


def processor_configs(image_size: int, mm_tokens_per_image: int) -> dict[str, dict]:
    """preprocessor_config.json (Gemma3ImageProcessor) and processor_config.json
    (Gemma3Processor), in the published Gemma 3 checkpoints' layout, for a model whose images
    are `image_size` pixels square and `mm_tokens_per_image` soft tokens. The values are the
    preprocessing in images.py: PIL bilinear resize, x / 255, mean 0.5, std 0.5; Pan & Scan
    off (null: the processor's defaults)."""
    image = {
        "image_processor_type": "Gemma3ImageProcessor",
        "processor_class": "Gemma3Processor",
        "size": {"height": image_size, "width": image_size},
        "do_resize": True,
        "resample": 2,  # PIL.Image.Resampling.BILINEAR
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": None,
        "do_pan_and_scan": None,
        "pan_and_scan_max_num_crops": None,
        "pan_and_scan_min_crop_size": None,
        "pan_and_scan_min_ratio_to_activate": None,
        "image_seq_length": mm_tokens_per_image,
    }
    processor = {"processor_class": "Gemma3Processor", "image_seq_length": mm_tokens_per_image}
    return {"preprocessor_config.json": image, "processor_config.json": processor}


def write_processor_files(folder: Path) -> list[str]:
    """Make a vision model folder open with transformers' `AutoProcessor`: write the processor
    files it lacks (never replacing ones a real checkpoint shipped) and name the image tokens
    in tokenizer_config.json where they are missing. Text-only folders are left as they are.
    Returns the names of the files written or changed."""
    import json

    from ..model.config import config_from_hf

    cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
    if not cfg.is_multimodal:
        return []
    written = []
    for name, content in processor_configs(cfg.vision.image_size, cfg.mm_tokens_per_image).items():
        if not (folder / name).is_file():
            (folder / name).write_text(json.dumps(content, indent=2) + "\n")
            written.append(name)
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.is_file():
        d = json.loads(tok_cfg.read_text())
        missing = {k: v for k, v in MM_TOKENS.items() if k not in d}
        if missing:
            tok_cfg.write_text(json.dumps({**d, **missing}, indent=2, ensure_ascii=False) + "\n")
            written.append(tok_cfg.name)
    return written


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


# ---------------------------------------------------------------------------------------------
# Loading a model folder's tokenizer


def _word_boundaries(tk) -> re.Pattern | None:
    """Where a text can be cut into words that tokenize independently, or None.

    Gemma's tokenizer.json has no effective pre-tokenizer: spaces become `▁` and BPE runs over
    the whole text, so nothing is cached and long texts are slow. BPE merges never cross a
    point that no vocabulary entry spans (every merge result is a vocabulary entry), so cutting
    there gives exactly the same ids. We cut before a single space (or `▁`) that sits between
    two other characters, unless the character before it ends the text part of some entry with
    an inner `▁` (Gemma 3 has one such entry, `>▁</`, so never after `>`). Runs of spaces are
    never cut. Only for this exact layout: a `Replace(' ', '▁')` normalizer, a no-op or absent
    pre-tokenizer, a BPE model, and no added token containing a space; anything else keeps the
    plain whole-text path. (tests/test_template.py checks it against the plain path.)"""
    import json

    def state(component) -> dict | None:
        return None if component is None else json.loads(component.__getstate__())

    norm, pre = state(tk.normalizer), state(tk.pre_tokenizer)
    if norm != {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}:
        return None
    noop_split = {"type": "Split", "pattern": {"String": " "}}  # spaces are gone by then
    if pre is not None and {k: pre.get(k) for k in noop_split} != noop_split:
        return None
    if type(tk.model).__name__ != "BPE":
        return None
    if any(" " in t.content or "▁" in t.content for t in tk.get_added_tokens_decoder().values()):
        return None
    vocab = tk.get_vocab(with_added_tokens=False)
    before = {w[i - 1] for w in vocab for i in range(1, len(w)) if w[i] == "▁" and w[i - 1] != "▁"}
    no_cut_after = re.escape("".join(sorted(before | {" ", "▁"})))
    return re.compile(rf"(?<=[^{no_cut_after}]) (?=[^ ▁])")


class Tokenizer:
    """A Gemma tokenizer from `tokenizer.model` (sentencepiece) or `tokenizer.json` (tokenizers).

    Special-token ids are looked up in the files, never hard-coded. `encode` never adds
    `<bos>`; the chat template does. Gemma's special strings in text are matched by us, so both
    backends treat them alike.
    """

    SPECIALS = ("<pad>", "<eos>", "<bos>", *GEMMA_USER_SYMBOLS)
    # FunctionGemma's control tokens: one token each where the vocabulary has them (kept in
    # decoded text, they are the call's syntax); plain text where it does not.
    FUNCTION_TOKENS = (
        "<start_function_declaration>",
        "<end_function_declaration>",
        "<start_function_call>",
        "<end_function_call>",
        "<start_function_response>",
        "<end_function_response>",
        "<escape>",
    )

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.folder = folder
        sp_file, json_file = folder / "tokenizer.model", folder / "tokenizer.json"
        if sp_file.is_file():
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(sp_file))
            self._tk = None
            self.vocab_size = self._sp.get_piece_size()
            lookup = {p: self._sp.piece_to_id(p) for p in self.SPECIALS + self.FUNCTION_TOKENS}
            lookup = {p: i for p, i in lookup.items() if self._sp.id_to_piece(i) == p}
        elif json_file.is_file():
            from tokenizers import Tokenizer as HFTokenizer

            self._sp = None
            self._tk = HFTokenizer.from_file(str(json_file))
            self.vocab_size = self._tk.get_vocab_size(with_added_tokens=True)
            lookup = {p: self._tk.token_to_id(p) for p in self.SPECIALS + self.FUNCTION_TOKENS}
            lookup = {p: i for p, i in lookup.items() if i is not None}
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer.model or tokenizer.json")
        self.ids: dict[str, int] = lookup
        for need in ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"):
            if need not in self.ids:
                raise ValueError(
                    f"{folder}: the tokenizer has no {need} token; is it a Gemma tokenizer?"
                )
        self.bos_id, self.eos_id = self.ids["<bos>"], self.ids["<eos>"]
        self.pad_id = self.ids.get("<pad>", 0)
        self.start_of_turn, self.end_of_turn = (
            self.ids["<start_of_turn>"],
            self.ids["<end_of_turn>"],
        )
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.ids) + ")")
        self._words = _word_boundaries(self._tk) if self._tk is not None else None
        self._word_ids: dict[str, list[int]] = {}
        self._bytes: dict[int, int] = {}  # token id -> bytes of text

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        if self._sp is not None:
            return list(self._sp.encode(text))
        if self._words is None:
            return list(self._tk.encode(text, add_special_tokens=False).ids)
        # Word by word, each word's ids memoised: the same ids (see _word_boundaries), several
        # times faster on real text, where most words repeat.
        out: list[int] = []
        memo = self._word_ids
        for i, word in enumerate(self._words.split(text)):
            if i:
                word = " " + word
            ids = memo.get(word)
            if ids is None:
                if len(memo) >= 1 << 20:  # bound the memory: start over
                    memo.clear()
                ids = memo[word] = self._tk.encode(word, add_special_tokens=False).ids
            out.extend(ids)
        return out

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in self._split.split(text):
            if piece in self.ids:
                out.append(self.ids[piece])
            else:
                out.extend(self._encode_plain(piece))
        return out

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        if skip_special:
            specials = {i for p, i in self.ids.items() if p not in self.FUNCTION_TOKENS}
            ids = [i for i in ids if i not in specials]
        if self._sp is not None:
            return self._sp.decode(list(ids))
        return self._tk.decode(list(ids), skip_special_tokens=False)

    def encode_spans(self, text: str) -> tuple[list[int], list[int]] | None:
        """`encode(text)` and the UTF-8 byte offset where each token ends, or None when the
        pieces do not spell the text back (a tokenizer that normalises): lets a caller give
        each token of one tokenization the label of the text it starts in."""
        ids = self.encode(text)
        ends, at = [], 0
        for i in ids:
            at += self._piece_bytes(i)
            ends.append(at)
        return (ids, ends) if at == len(text.encode("utf-8")) else None

    def _piece_bytes(self, i: int) -> int:
        """Bytes of text one token stands for: `▁` is a space, `<0xNN>` one byte."""
        n = self._bytes.get(i)
        if n is None:
            piece = self._sp.id_to_piece(i) if self._sp is not None else self._tk.id_to_token(i)
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                n = 1
            else:
                n = len(piece.replace("\u2581", " ").encode("utf-8"))
            self._bytes[i] = n
        return n

    def stop_ids(self) -> set[int]:
        """Where a reply ends: `<end_of_turn>`, EOS, and `<start_function_response>` (a call
        hands over to the tool) where the vocabulary has it; in text form, see
        `template.stop_at_call`."""
        stops = {self.end_of_turn, self.eos_id}
        if "<start_function_response>" in self.ids:
            stops.add(self.ids["<start_function_response>"])
        return stops
