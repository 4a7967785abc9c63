"""Chat template against hand-written token sequences (real Gemma 3 tokenizer and a tiny one)."""

from __future__ import annotations

import pytest

from gemma3_tune.data.template import IGNORE, ImageRef, Turn, VisionTokens, render
from gemma3_tune.data.tokenizer import Tokenizer

CHAT = [
    Turn("system", ["Be brief."]),
    Turn("user", ["  Hi  "]),
    Turn("assistant", ["Hello!"]),
    Turn("user", ["Bye"]),
    Turn("assistant", ["Ciao"]),
]


def _pieces(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok._tk.id_to_token(i) if tok._tk is not None else tok._sp.id_to_piece(i) for i in ids]


@pytest.mark.slow
def test_real_tokenizer_system_and_multi_turn(real_270m):
    tok = Tokenizer(real_270m[1])
    s = render(CHAT, tok, None, "assistant")
    # Written by hand from Gemma 3's template; "x" marks tokens with loss.
    expected = [
        ("<bos>", ""), ("<start_of_turn>", ""), ("user", ""), ("\n", ""), ("Be", ""), ("▁brief", ""), (".", ""),
        ("\n\n", ""), ("Hi", ""), ("<end_of_turn>", ""), ("\n", ""),
        ("<start_of_turn>", ""), ("model", ""), ("\n", ""), ("Hello", "x"), ("!", "x"), ("<end_of_turn>", "x"),
        ("\n", ""), ("<start_of_turn>", ""), ("user", ""), ("\n", ""), ("Bye", ""), ("<end_of_turn>", ""), ("\n", ""),
        ("<start_of_turn>", ""), ("model", ""), ("\n", ""), ("Ciao", "x"), ("<end_of_turn>", "x"), ("\n", ""),
    ]  # fmt: skip
    assert _pieces(tok, s.input_ids) == [p for p, _ in expected]
    assert [lab != IGNORE for lab in s.labels] == [m == "x" for _, m in expected]
    assert [lab for lab in s.labels if lab != IGNORE] == [
        i for i, (_, m) in zip(s.input_ids, expected, strict=True) if m
    ]
    assert s.input_ids[:4] == [2, 105, 2364, 107]  # ids read from the file, checked by hand


@pytest.mark.slow
def test_real_tokenizer_equals_whole_string_tokenization(real_270m):
    """Tokenizing in runs gives exactly the tokens of the whole rendered string."""
    from tokenizers import Tokenizer as HF

    tok = Tokenizer(real_270m[1])
    hf = HF.from_file(str(real_270m[1] / "tokenizer.json"))
    text = (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\nCiao<end_of_turn>\n"
    )
    assert render(CHAT, tok, None).input_ids == hf.encode(text, add_special_tokens=False).ids


def test_tiny_tokenizer_image_block_and_train_on_modes(tiny_vision_dir):
    from gemma3_tune.model.checkpoint import read_config

    tok = Tokenizer(tiny_vision_dir)
    cfg = read_config(tiny_vision_dir)
    vis = VisionTokens(
        cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id, cfg.mm_tokens_per_image
    )
    turns = [
        Turn("user", [ImageRef("a.png"), "What?"]),
        Turn("assistant", ["red"]),
        Turn("user", ["And?"]),
        Turn("assistant", ["blue"]),
    ]
    s = render(turns, tok, vis, "assistant")
    enc = tok.encode
    expected = (
        [tok.bos_id, tok.start_of_turn] + enc("user\n\n\n") + [cfg.boi_token_id] + [cfg.image_token_id] * 16
        + [cfg.eoi_token_id] + enc("\n\nWhat?") + [tok.end_of_turn] + enc("\n") + [tok.start_of_turn] + enc("model\n")
        + enc("red") + [tok.end_of_turn] + enc("\n") + [tok.start_of_turn] + enc("user\nAnd?") + [tok.end_of_turn]
        + enc("\n") + [tok.start_of_turn] + enc("model\n") + enc("blue") + [tok.end_of_turn] + enc("\n")
    )  # fmt: skip
    assert s.input_ids == expected
    trained = [i for i, lab in zip(s.input_ids, s.labels, strict=True) if lab != IGNORE]
    assert trained == enc("red") + [tok.end_of_turn] + enc("blue") + [tok.end_of_turn]
    last = render(turns, tok, vis, "last")
    assert [i for i, lab in zip(last.input_ids, last.labels, strict=True) if lab != IGNORE] == enc(
        "blue"
    ) + [tok.end_of_turn]
    everything = render(turns, tok, vis, "all")
    masked = [
        i for i, lab in zip(everything.input_ids, everything.labels, strict=True) if lab == IGNORE
    ]
    assert (
        masked
        == [tok.bos_id, tok.start_of_turn] + [cfg.image_token_id] * 16 + [tok.start_of_turn] * 3
    )


def test_pan_and_scan_text(tiny_vision_dir):
    from gemma3_tune.model.checkpoint import read_config

    tok = Tokenizer(tiny_vision_dir)
    cfg = read_config(tiny_vision_dir)
    vis = VisionTokens(cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id, 4)
    s = render([Turn("user", [ImageRef("w.png", views=3)]), Turn("assistant", ["ok"])], tok, vis)
    block = "\n\n<start_of_image>" + "<image_soft_token>" * 4 + "<end_of_image>\n\n"
    text = (
        "<start_of_turn>user\nHere is the original image " + block
        + " and here are some crops to help you see better " + block + " " + block + "<end_of_turn>\n"
    )  # fmt: skip
    assert s.input_ids[1 : 1 + len(tok.encode(text))] == tok.encode(text)
    assert s.input_ids.count(cfg.boi_token_id) == 3


def test_both_tokenizer_files_give_the_same_ids(tiny_vision_dir, tmp_path):
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_vision_dir / name, tmp_path / name)
    sp, js = Tokenizer(tiny_vision_dir), Tokenizer(tmp_path)  # tokenizer.model first, else .json
    assert sp._sp is not None and js._tk is not None
    text = "<start_of_turn>user\nHow many  apples? 12<end_of_turn>\n<start_of_image> ☃"
    assert sp.encode(text) == js.encode(text)
    assert sp.ids == js.ids


ADVERSARIAL = [
    "a  b", "x > </y", "> </ >  </", "<b> </b>", "a\n b", " lead", "trail ", "  two lead",
    "tab\tx y", "a   b    c", "x.\n\ny z", "a ▁ b", "a▁b ▁▁c", " ", "  ", "", "émoji 🤖 x y",
    "日本語 テキスト です", "1 2 3 45 678", "{\"name\": \"x\", \"age\": 12}", "it's a b-c d_e",
]  # fmt: skip


def _texts(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    alphabet = list("abcdefghij kl  mn>.</\n\t,?!12") + ["▁", "é", "🤖", "the", "answer", " "]
    return ADVERSARIAL + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(n)
    ]


def _word_path_equals_plain(tok: Tokenizer, texts: list[str]) -> None:
    assert tok._words is not None  # the fast path is on for this tokenizer.json
    for text in texts:
        want = tok._tk.encode(text, add_special_tokens=False).ids  # the whole text at once
        assert tok._encode_plain(text) == want, repr(text)
        assert tok._encode_plain(text) == want, repr(text)  # memoised words too


def test_word_by_word_encoding_equals_whole_text(tiny_vision_dir, tmp_path):
    """The memoised word-by-word path gives the ids of tokenizing the whole text (tiny
    tokenizer.json, same layout as Gemma 3's), on adversarial and random texts."""
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_vision_dir / name, tmp_path / name)
    _word_path_equals_plain(Tokenizer(tmp_path), _texts(3000))


@pytest.mark.slow
def test_real_tokenizer_word_by_word_equals_whole_text(real_270m):
    """The same on the real Gemma 3 vocabulary (its one entry with an inner `▁`, `>▁</`, is
    in the adversarial texts), plus the quickstart data's replies."""
    import json
    from pathlib import Path

    data = Path(__file__).parent.parent / "data" / "quickstart"
    texts = [
        m["content"]
        for f in sorted(data.glob("*.jsonl"))
        for line in f.read_text().splitlines()[:200]
        for m in json.loads(line)["messages"]
    ]
    _word_path_equals_plain(Tokenizer(real_270m[1]), _texts(3000) + texts)
