"""Each bad input gets its one-line error naming file and line, exit code 2, no traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from gemma3_tune.cli import main

OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _recipe(tmp_path, model_dir, data_file="d.jsonl"):
    r = tmp_path / "r.yaml"
    r.write_text(
        f"model:\n  path: {model_dir}\ndata:\n  train: {tmp_path / data_file}\n  image_root: {tmp_path}\n"
    )
    return r


def _img(tmp_path, name="ok.png"):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / name)
    return name


def _line(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode() if not isinstance(obj, bytes) else obj


CASES = {
    "broken_json": (b'{"messages": [}\n', "broken JSON"),
    "unknown_role": ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    "missing_content": (
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
        "missing content",
    ),
    "no_messages_key": ({"body": "hello"}, "no 'messages' or 'conversations' key"),
    "not_alternating": (
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        "must alternate",
    ),
    "no_reply": ({"messages": [{"role": "user", "content": "a"}]}, "no assistant reply"),
    "missing_image": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "nope.png"}]},
                {"role": "assistant", "content": "x"},
            ]
        },
        "image not found",
    ),
    "corrupt_image": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "bad.png"}]},
                {"role": "assistant", "content": "x"},
            ]
        },
        "cannot read image",
    ),
    "too_large_image": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "ok.png"}]},
                {"role": "assistant", "content": "x"},
            ]
        },
        "image too large",
    ),
    "placeholder_mismatch": (
        {
            "conversations": [
                {"from": "human", "value": "<image><image> what"},
                {"from": "gpt", "value": "x"},
            ],
            "images": ["ok.png"],
        },
        "2 <image> placeholder(s) but 1 image(s)",
    ),
    "non_utf8": (b'{"messages": "\xff\xfe"}\n', "not UTF-8"),
    "bad_part": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "video"}]},
                {"role": "assistant", "content": "x"},
            ]
        },
        "part 0",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_sample_one_line_error(case, tmp_path, tiny_vision_dir, capsys, monkeypatch):
    bad, message = CASES[case]
    _img(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    if case == "too_large_image":
        import gemma3_tune.data.images as images

        monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    (tmp_path / "d.jsonl").write_bytes(_line(OK) + _line(bad) + _line(OK))
    assert main(["data", "check", str(_recipe(tmp_path, tiny_vision_dir))]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    first = err.splitlines()[0]
    assert first.startswith("error: ") and "d.jsonl:2: " in first and message in first, first


def test_broken_json_column_is_within_the_line(tmp_path, tiny_dir, capsys):
    """A line missing its closing brace: the column is where that line ends (its length + 1,
    counted by hand here), not column 1 of the next line, and the line's start is shown."""
    good = json.dumps(OK)
    broken = good[:-1]  # no closing "}"
    mid = '{"messages": [}'  # the "}" is character 15
    for bad, column in ((broken, len(broken) + 1), (mid, 15)):
        (tmp_path / "d.jsonl").write_text(good + "\n" + bad + "\n" + good + "\n")
        assert main(["data", "check", str(_recipe(tmp_path, tiny_dir))]) == 2
        first = capsys.readouterr().err.splitlines()[0]
        assert "d.jsonl:2: broken JSON (" in first and f"at column {column}):" in first, first
        shown = first.split("):", 1)[1].strip()
        assert bad.startswith(shown.removesuffix("...")) and len(shown) <= 60, shown


def test_empty_file(tmp_path, tiny_dir, capsys):
    (tmp_path / "d.jsonl").write_text("\n")
    assert main(["data", "check", str(_recipe(tmp_path, tiny_dir))]) == 2
    err = capsys.readouterr().err
    assert "d.jsonl: empty file" in err and "Traceback" not in err


def test_image_for_text_only_model(tmp_path, tiny_dir, capsys):
    _img(tmp_path)
    bad = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": "ok.png"}]},
            {"role": "assistant", "content": "x"},
        ]
    }
    (tmp_path / "d.jsonl").write_bytes(_line(bad))
    assert main(["data", "check", str(_recipe(tmp_path, tiny_dir))]) == 2
    assert "d.jsonl:1: has an image, but the model is text-only" in capsys.readouterr().err


def test_all_bad_samples_are_listed(tmp_path, tiny_dir, capsys):
    lines = [
        _line(OK),
        b"{broken\n",
        _line({"messages": [{"role": "x", "content": "y"}]}),
        _line(OK),
        b"[1]\n",
    ]
    (tmp_path / "d.jsonl").write_bytes(b"".join(lines))
    assert main(["data", "check", str(_recipe(tmp_path, tiny_dir))]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [e.split(": ")[1].rsplit(":", 1)[1] for e in err[:3]] == ["2", "3", "5"]
    assert "3 bad sample(s)" in err[3]


def test_good_data_check_json_line(tmp_path, tiny_vision_dir, capsys):
    img = _img(tmp_path)
    vis = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "image": img}, {"type": "text", "text": "?"}],
            },
            {"role": "assistant", "content": "dark"},
        ]
    }
    (tmp_path / "d.jsonl").write_bytes(_line(OK) + _line(vis))
    assert main(["data", "check", str(_recipe(tmp_path, tiny_vision_dir)), "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert {k: summary[k] for k in ("samples", "images", "truncated", "dropped")} == {
        "samples": 2,
        "images": 1,
        "truncated": 0,
        "dropped": 0,
    }
    assert summary["trainable_tokens"] > 0 and 0 < summary["packing_efficiency"] <= 1
    assert "[[hello<end_of_turn>]]" in out  # the rendered sample shows its loss mask


def _long_and_short(tmp_path, n_long: int, n_short: int, words: int = 60) -> list[dict]:
    """n_short chats of a few tokens and n_long chats of about `words` tokens, long ones first
    (so the first sample in file order is one that max_seq_len 32 drops)."""
    long = {
        "messages": [
            {"role": "user", "content": "tell me more"},
            {"role": "assistant", "content": " ".join(f"w{i}" for i in range(words))},
        ]
    }
    rows = [long] * n_long + [OK] * n_short
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _drop_recipe(tmp_path, model_dir, extra: str = "") -> str:
    r = _recipe(tmp_path, model_dir)
    r.write_text(r.read_text() + f"  max_seq_len: 32\n  truncation: drop\n{extra}")
    return str(r)


def test_mostly_dropped_data_is_refused_unless_allowed(tmp_path, tiny_dir, capsys):
    """49 of 54 dropped: data check and train both refuse (one line naming the keys) before a
    model is loaded; with data.allow_drop they go on, warn, and show a kept sample."""
    _long_and_short(tmp_path, 49, 5)
    recipe = _drop_recipe(tmp_path, tiny_dir)
    assert main(["data", "check", recipe, "--json"]) == 2
    cap = capsys.readouterr()
    summary = json.loads(cap.out.strip().splitlines()[-1])
    assert (summary["samples"], summary["dropped"]) == (5, 49)
    err = cap.err.strip().splitlines()
    assert err[0].startswith("warning: 49 of 54 samples dropped and 0 truncated (91%;"), err
    assert err[1] == (
        "error: data: 49 of 54 samples (91%) are over data.max_seq_len 32 and would be dropped;"
        " raise data.max_seq_len or set data.truncation: truncate, or set data.allow_drop: true"
        " to train on the rest"
    )
    out = tmp_path / "run"
    assert main(["train", recipe, f"training.output_dir={out}", "training.max_steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: data: 49 of 54 samples (91%)") and "Traceback" not in err

    allowed = _drop_recipe(tmp_path, tiny_dir, "  allow_drop: true\n")
    assert main(["data", "check", allowed]) == 0
    cap = capsys.readouterr()
    assert cap.err.startswith("warning: 49 of 54 samples dropped")
    # the rendered sample is the first kept one (line 50), not line 1, which was dropped
    assert "first sample (" in cap.out and "d.jsonl:50)" in cap.out, cap.out


def test_truncation_warning_counts_samples_and_tokens(tmp_path, tiny_dir, capsys):
    """1 of 40 samples over the limit is 2.5% of samples, no warning by count; but it loses
    most of its tokens, and when those are over 5% of all tokens the warning fires."""
    from gemma3_tune.data.prepare import prepare
    from gemma3_tune.data.settings import DataConfig
    from gemma3_tune.model.checkpoint import read_config

    cfg = read_config(tiny_dir)
    for words, warn in ((15, False), (300, True)):
        _long_and_short(tmp_path, 1, 39, words=words)
        # the long chat's full length, rendered with room to spare: the reference count
        full = prepare(
            DataConfig(train=str(tmp_path / "d.jsonl"), max_seq_len=4096),
            tiny_dir,
            cfg,
            tmp_path,
            0,
        )
        lengths = sorted(full.report.lengths)
        total, longest = sum(lengths), lengths[-1]
        r = _recipe(tmp_path, tiny_dir)
        r.write_text(r.read_text() + "  max_seq_len: 32\n  packing: false\n")
        assert main(["data", "check", str(r), "--json"]) == 0
        cap = capsys.readouterr()
        summary = json.loads(cap.out.strip().splitlines()[-1])
        lost = longest - 32
        assert lost > 0
        assert (summary["truncated"], summary["lost_tokens"]) == (1, lost)
        assert summary["tokens"] == total - lost
        line = (
            f"warning: 0 of 40 samples dropped and 1 truncated (2%; {lost:,} of {total:,} tokens,"
            f" {lost / total:.0%}) at data.max_seq_len 32; raise data.max_seq_len"
        )
        assert (lost / total > 0.05) == warn
        assert cap.err.strip() == (line if warn else ""), cap.err
