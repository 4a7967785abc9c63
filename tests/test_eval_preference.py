"""`gemma3-tune eval --metric preference`: held-out preference pairs scored by the summed reply
log-probs of our model's packed `sequence_logps` forward, checked against each document
rendered alone and scored from the plain logits (log_softmax, summed over the reply labels);
the same numbers from a GGUF of the model and with images; bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from trainutil import chat_set, colour_set, refused_in_one_line

from gemma3_tune.cli import main
from gemma3_tune.data.images import preprocess
from gemma3_tune.data.sources import Record, to_turns
from gemma3_tune.data.template import IGNORE, render
from gemma3_tune.data.tokenizer import Tokenizer
from gemma3_tune.eval.runner import pair_groups
from gemma3_tune.model.checkpoint import load_model

# (prompt, chosen, rejected): a random model gives a longer reply the lower summed log-prob, so
# pairs with the shorter reply chosen go one way and the others the other way.
PAIRS = [
    ("number 3", "3", "the answer is 3 3 and more words here"),
    ("number 5", "the answer is 5 5 and also some other text", "5"),
    ("number 1", "one", "the answer is 1 1 1 1 1 1 1"),
    ("say hi", "hello there my friend how are you today", "hi"),
    ("number 7", "7 7", "seven seven seven seven seven"),
    ("number 2", "the answer is two two two two two", "2"),
    ("number 9", "9", "nine is the answer, nine nine"),
]


def _rows(pairs) -> list[dict]:
    """Explicit (string) rows, and every third one in the implicit format (two conversations
    sharing their first turn), which training renders the same way."""
    rows = []
    for i, (p, c, r) in enumerate(pairs):
        if i % 3 == 2:
            user = {"role": "user", "content": p}
            rows.append(
                {
                    "chosen": [user, {"role": "assistant", "content": c}],
                    "rejected": [user, {"role": "assistant", "content": r}],
                }
            )
        else:
            rows.append({"prompt": p, "chosen": c, "rejected": r})
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _reply_logp(model, tok, messages: list, base: Path, images=(), vision=None) -> float:
    """The reference: one conversation rendered alone (loss on its assistant turn, as in SFT),
    log_softmax over the model's plain logits, summed over the labelled next tokens."""
    record = Record("x", {"messages": messages, **({"images": list(images)} if images else {})})
    s = render(to_turns(record, base=base), tok, vision)
    pixels = None
    if s.images:
        size = model.config.vision.image_size
        pixels = torch.cat([preprocess(im.path, size, False) for im in s.images])
    with torch.no_grad():
        logits = model(torch.tensor([s.input_ids]), pixel_values=pixels).logits[0]  # [T, V]
    logp = torch.log_softmax(logits.double(), dim=-1)
    labels = torch.tensor(s.labels)
    t = torch.nonzero(labels[1:] != IGNORE).squeeze(1)  # position t predicts token t + 1
    return float(logp[t, labels[t + 1]].sum())


def _chat(prompt, reply) -> list:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def _run(argv, capsys) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    return {"stdout": out, "json": json.loads(out.strip().splitlines()[-1])}


def test_pair_groups_pack_consecutive_pairs_within_count_and_tokens():
    assert pair_groups([10, 10, 10, 10, 10, 10, 10], 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert pair_groups([60, 50, 30, 200, 10], 8, budget=100) == [[0], [1, 2], [3], [4]]


def test_score_and_margin_equal_the_plain_logits(tmp_path, tiny_dir, capsys):
    """7 pairs, 3 per packed forward (groups of 3, 3, 1): every pair's two log-probs, the share
    of pairs won (strictly between 0 and 100%) and the mean margin equal the reference; an f32
    GGUF of the same model, de-quantized into ours, gets the same numbers."""
    data = _write(tmp_path / "pairs.jsonl", _rows(PAIRS))
    gguf = tmp_path / "tiny.gguf"
    export = [
        "export",
        str(tiny_dir),
        "--format",
        "gguf",
        "--gguf-dtype",
        "f32",
        "--out",
        str(gguf),
    ]
    assert main(export) == 0
    out = tmp_path / "eval"
    folder = str(tiny_dir)
    argv = ["eval", folder, str(gguf), "--data", str(data), "--metric", "preference",
            "--batch-size", "3", "--out", str(out), "--json", "--dtype", "float32"]  # fmt: skip
    got = _run(argv, capsys)

    model, tok = load_model(tiny_dir).eval(), Tokenizer(tiny_dir)
    want = [
        (_reply_logp(model, tok, _chat(p, c), tmp_path), _reply_logp(model, tok, _chat(p, r), tmp_path))
        for p, c, r in PAIRS
    ]  # fmt: skip
    wins = [float(c > r) for c, r in want]
    share, margin = sum(wins) / len(wins), sum(c - r for c, r in want) / len(want)
    assert 0 < share < 1, want  # some pairs go each way

    line = got["json"]
    assert line["metric"] == "preference" and line["n"] == len(PAIRS)
    for label in (folder, str(gguf)):
        assert line["scores"][label] == share
        assert abs(line["margin"][label] - margin) <= 1e-4, (line, margin)
    assert f"| {folder} | {100 * share:.1f}% (log-prob margin {margin:.2f} nats) |" in got["stdout"]
    assert f"{len(PAIRS)} pairs" in got["stdout"]

    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == PAIRS
    for row, (c, r), win in zip(rows, want, wins, strict=True):
        for label in (folder, str(gguf)):
            t = row["targets"][label]
            assert abs(t["chosen_logp"] - c) <= 1e-4 and abs(t["rejected_logp"] - r) <= 1e-4
            assert t["preference"] == win
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scores"][folder]["preference"] == share
    assert abs(summary["margin"][folder] - margin) <= 1e-4


def test_vision_pairs_score_with_their_images(tmp_path, tiny_vision_dir, capsys):
    """Pairs whose prompt holds an image (TRL's `{"type": "image"}` + `images`), packed two per
    forward with both copies of each image: the same numbers as each conversation alone."""
    colour_set(tmp_path, 3, seed=4)
    images = sorted(p.name for p in tmp_path.glob("*.png"))
    question = [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]
    replies = [("red", "blue or green, or maybe"), ("a very pale shade of yellow", "green"),
               ("white", "black and grey")]  # fmt: skip
    rows = [
        {"prompt": [{"role": "user", "content": question}], "chosen": c, "rejected": r,
         "images": [im]}
        for im, (c, r) in zip(images, replies, strict=True)
    ]  # fmt: skip
    data = _write(tmp_path / "pairs.jsonl", rows)
    argv = ["eval", str(tiny_vision_dir), "--data", str(data), "--metric", "preference",
            "--batch-size", "2", "--json", "--dtype", "float32"]  # fmt: skip
    line = _run(argv, capsys)["json"]

    from gemma3_tune.data.dataset import vision_tokens

    model, tok = load_model(tiny_vision_dir).eval(), Tokenizer(tiny_vision_dir)
    vision = vision_tokens(model.config)

    def logp(image, reply):
        msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        return _reply_logp(model, tok, msgs, tmp_path, [image], vision)

    want = [(logp(im, c), logp(im, r)) for im, (c, r) in zip(images, replies, strict=True)]
    label = str(tiny_vision_dir)
    assert line["scores"][label] == sum(float(c > r) for c, r in want) / len(want)
    assert abs(line["margin"][label] - sum(c - r for c, r in want) / len(want)) <= 1e-4


def test_refusals_are_one_line(tmp_path, tiny_dir, capsys):
    pairs = _write(tmp_path / "pairs.jsonl", _rows(PAIRS[:2]))
    chats = chat_set(tmp_path / "chats.jsonl", n=2)

    def refused(argv, *needles):
        refused_in_one_line(capsys, argv, *needles)

    model = str(tiny_dir)
    pref = ["--metric", "preference"]
    refused(["eval", model, "--data", str(chats), *pref], "chats.jsonl:1", "not a preference pair")
    refused(["eval", model, "--data", str(pairs)], "pairs.jsonl:1", "--metric preference")
    refused(["eval", model, "--data", str(pairs), "--metric", "loss"], "pairs.jsonl:1")
    half = _write(tmp_path / "half.jsonl", [*_rows(PAIRS[:1]), {"prompt": "hi", "chosen": "yo"}])
    refused(["eval", model, "--data", str(half), *pref], "half.jsonl:2", "'rejected'")
    refused(["eval", model, "--data", str(pairs), *pref, "--metric", "exact"], "two evals")
    refused(["eval", model, "--data", str(pairs), *pref, "--batch-size", "0"], "--batch-size 0")
    llama = ["--backend", "llama.cpp"]
    refused(["eval", model, "--data", str(pairs), *pref, *llama], "drop --backend llama.cpp")
    colour_set(tmp_path, 1, seed=5)
    image = next(tmp_path.glob("*.png")).name
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    row = {"prompt": prompt, "chosen": "red", "rejected": "blue", "images": [image]}
    seen = _write(tmp_path / "img.jsonl", [row])
    refused(["eval", model, "--data", str(seen), *pref], "img.jsonl:1", "text-only")


def test_a_missing_image_is_one_line(tmp_path, tiny_vision_dir, capsys):
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    row = {"prompt": prompt, "chosen": "red", "rejected": "blue", "images": ["nope.png"]}
    data = _write(tmp_path / "p.jsonl", [row])
    assert main(["eval", str(tiny_vision_dir), "--data", str(data), "--metric", "preference"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "p.jsonl:1" in err and "nope.png" in err, err
