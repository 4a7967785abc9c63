"""Preference pairs as data: TRL's formats rendered into one sample of two documents, packed
whole, and every bad row refused in one line (data/preference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainutil import colour_set, write_recipe

from gemma3_tune.cli import main
from gemma3_tune.data.collate import concat_row
from gemma3_tune.data.preference import render_pair
from gemma3_tune.data.records import Record
from gemma3_tune.data.sources import to_turns
from gemma3_tune.data.template import IGNORE, render
from gemma3_tune.data.tokenizer import Tokenizer

PROMPT = "number 3"
CHOSEN = "the answer is 3 3"
REJECTED = "the answer is 5 5"


def _msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def _pair(rec: dict, tok, vision=None, base: Path = Path(".")):
    return render_pair(Record("f.jsonl:1", rec), tok, vision, {"base": base})


def _chat(turns: list, tok, train_on="last"):
    return render(to_turns(Record("x", {"messages": turns})), tok, None, train_on)


def test_pair_is_two_documents_scoring_only_the_replies(tiny_dir):
    tok = Tokenizer(tiny_dir)
    s = _pair({"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}, tok)
    # The independent reference: each conversation rendered alone, loss on its last reply only.
    c = _chat(_msgs(("user", PROMPT), ("assistant", CHOSEN)), tok)
    r = _chat(_msgs(("user", PROMPT), ("assistant", REJECTED)), tok)
    assert s.split == len(c)
    assert s.input_ids == c.input_ids + r.input_ids
    assert s.labels == c.labels + r.labels
    reply = [tok.decode([t]) for t in s.labels[: s.split] if t != IGNORE]
    assert "".join(reply).startswith("the answer is 3 3")
    row = concat_row([s, s])
    assert row["position_ids"] == [
        *range(len(c)),
        *range(len(r)),
        *range(len(c)),
        *range(len(r)),
    ]


def test_formats_agree(tiny_dir):
    """String, message-list and implicit-prompt rows give the same sample; in a multi-turn
    implicit pair the shared assistant turn is context (no loss), only the replies score."""
    tok = Tokenizer(tiny_dir)
    a = _pair({"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}, tok)
    b = _pair(
        {
            "prompt": _msgs(("user", PROMPT)),
            "chosen": _msgs(("assistant", CHOSEN)),
            "rejected": _msgs(("assistant", REJECTED)),
        },
        tok,
    )
    c = _pair(
        {
            "chosen": _msgs(("user", PROMPT), ("assistant", CHOSEN)),
            "rejected": _msgs(("user", PROMPT), ("assistant", REJECTED)),
        },
        tok,
    )
    assert (a.input_ids, a.labels, a.split) == (b.input_ids, b.labels, b.split)
    assert (a.input_ids, a.labels, a.split) == (c.input_ids, c.labels, c.split)
    history = [("user", "hi"), ("assistant", "hello"), ("user", PROMPT)]
    m = _pair(
        {
            "chosen": _msgs(*history, ("assistant", CHOSEN)),
            "rejected": _msgs(*history, ("assistant", REJECTED)),
        },
        tok,
    )
    ref_c = _chat(_msgs(*history, ("assistant", CHOSEN)), tok, "last")
    ref_r = _chat(_msgs(*history, ("assistant", REJECTED)), tok, "last")
    assert m.labels == ref_c.labels + ref_r.labels
    assert _chat(_msgs(*history, ("assistant", CHOSEN)), tok, "assistant").labels != ref_c.labels


def _check(tmp_path: Path, tiny_dir: Path, rows: list, capsys, **over) -> tuple[int, str]:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, data, tmp_path / "out", **over)
    rc = main(["data", "check", str(recipe)])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_bad_pairs_one_line_each(tmp_path, tiny_dir, capsys):
    good = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}
    rows = [
        good,
        {"prompt": "a", "chosen": "b", "rejected": "b"},
        {"prompt": "a", "chosen": "b"},
        {"prompt": "a", "chosen": " ", "rejected": "c"},
        {"prompt": "a", "chosen": _msgs(("user", "q")), "rejected": "c"},
        {"messages": _msgs(("user", "a"), ("assistant", "b"))},
    ]
    rc, text = _check(tmp_path, tiny_dir, rows, capsys, objective="dpo")
    assert rc == 2
    errors = [x for x in text.splitlines() if x.startswith("error: ")]
    f = tmp_path / "pairs.jsonl"
    assert errors[:5] == [
        f"error: {f}:2: 'chosen' equals 'rejected': the pair teaches nothing; fix or drop it",
        f"error: {f}:3: has chosen but no 'rejected'; a preference row is"
        ' {"prompt": ..., "chosen": ..., "rejected": ...} (TRL\'s preference format)',
        f"error: {f}:4: 'chosen' is empty: a pair needs a reply on both sides",
        f"error: {f}:5: 'chosen' must start with the assistant's reply (its first message has"
        " role 'user')",
        f"error: {f}:6: a 'messages' row is not a preference pair: objective dpo/orpo needs"
        ' {"prompt": ..., "chosen": ..., "rejected": ...} (TRL\'s preference format); for chats'
        " use objective: sft",
    ]
    assert "Traceback" not in text
    # and a preference file under objective: sft
    rc, text = _check(tmp_path, tiny_dir, [good], capsys, objective="sft")
    assert rc == 2
    assert (
        f"error: {f}:1: a preference pair (TRL's prompt/chosen/rejected), not a chat; set"
        " objective: dpo (or orpo) to train on pairs"
    ) in text


def test_long_pair_dropped_and_counted_never_cut(tmp_path, tiny_dir, capsys):
    long = " ".join(["word"] * 80)
    rows = [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}] * 3
    rows.append({"prompt": PROMPT, "chosen": long, "rejected": REJECTED})
    rc, text = _check(tmp_path, tiny_dir, rows, capsys, objective="dpo", data__max_seq_len=96)
    assert rc == 0
    assert "samples            3 pairs" in text
    assert "dropped            1" in text
    assert "the pair takes" in text and "a pair is never cut" in text
    assert "--- prompt + chosen" in text and "--- prompt + rejected" in text


def test_packed_rows_keep_pairs_whole(tmp_path, tiny_dir):
    from gemma3_tune.train.recipe import load_recipe
    from gemma3_tune.train.run_data import load_data

    rows = [
        {"prompt": f"number {k}", "chosen": f"the answer is {k} {k}", "rejected": "x " * k}
        for k in range(1, 30)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, data, tmp_path / "out", objective="dpo")
    _, _, prepared = load_data(load_recipe(recipe))
    tok = Tokenizer(tiny_dir)
    seen = 0
    for row in prepared.train_rows:
        for s in row:
            want = _pair(json.loads(_line(data, s.origin)), tok)
            assert (s.input_ids, s.labels, s.split) == (want.input_ids, want.labels, want.split)
            seen += 1
    assert seen == prepared.report.samples == len(rows) - prepared.report.eval_samples
    assert prepared.report.rows < seen  # packed: several pairs per row


def _line(path: Path, origin: str) -> str:
    return path.read_text().splitlines()[int(origin.rsplit(":", 1)[1]) - 1]


def test_vision_pair_carries_the_image_in_both_documents(tmp_path, tiny_vision_dir):
    from gemma3_tune.data.dataset import vision_tokens
    from gemma3_tune.model.checkpoint import read_config

    colour_set(tmp_path, 1, seed=3)
    image = next(tmp_path.glob("*.png")).name
    tok = Tokenizer(tiny_vision_dir)
    vision = vision_tokens(read_config(tiny_vision_dir))
    prompt = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What colour is this?"}],
        }
    ]
    s = _pair(
        {"prompt": prompt, "chosen": "red", "rejected": "blue", "images": [image]},
        tok,
        vision,
        tmp_path,
    )
    n_img = vision.tokens_per_image
    first, second = s.input_ids[: s.split], s.input_ids[s.split :]
    assert first.count(vision.image_token_id) == n_img == second.count(vision.image_token_id)
    assert [Path(im.path).name for im in s.images] == [image, image]
    assert all(
        lab == IGNORE
        for t, lab in zip(s.input_ids, s.labels, strict=True)
        if t == vision.image_token_id
    )
    msgs = [*prompt, {"role": "assistant", "content": "red"}]
    alone = render(
        to_turns(Record("x", {"messages": msgs, "images": [image]}), base=tmp_path),
        tok,
        vision,
        "last",
    )
    assert first == alone.input_ids and s.labels[: s.split] == alone.labels


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_recipe_objective_and_preference_keys(tmp_path, tiny_dir, objective):
    from gemma3_tune.errors import UserError
    from gemma3_tune.train.recipe import load_recipe

    data = tmp_path / "d.jsonl"
    data.write_text("")
    path = write_recipe(tmp_path / "r.yaml", tiny_dir, data, tmp_path / "o", objective=objective)
    r = load_recipe(path, ["preference.beta=0.2", "preference.loss=ipo"])
    assert (r.objective, r.preference.beta, r.preference.loss) == (objective, 0.2, "ipo")
    with pytest.raises(UserError, match=r"preference\.loss: Input should be 'sigmoid' or 'ipo'"):
        load_recipe(path, ["preference.loss=hinge"])


def test_parquet_and_saved_datasets_read_like_jsonl(tmp_path, tiny_dir):
    """The same sources as chats: a Parquet file and a `save_to_disk` folder of TRL rows give
    the pairs the JSONL gives."""
    import datasets

    from gemma3_tune.train.recipe import load_recipe
    from gemma3_tune.train.run_data import load_data

    rows = [
        {"prompt": f"number {k}", "chosen": f"the answer is {k} {k}", "rejected": f"{k + 1}"}
        for k in range(6)
    ]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "pairs.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    got = []
    for src in (jsonl, tmp_path / "pairs.parquet", tmp_path / "saved"):
        recipe = write_recipe(
            tmp_path / "r.yaml", tiny_dir, src, tmp_path / "out", objective="dpo",
            data__eval_split=0.0,
        )  # fmt: skip
        _, _, prepared = load_data(load_recipe(recipe))
        samples = sorted(
            (tuple(s.input_ids), tuple(s.labels), s.split)
            for row in prepared.train_rows
            for s in row
        )
        got.append(samples)
    assert len(got[0]) == 6 and got[0] == got[1] == got[2]


def test_tool_calling_pair(tiny_dir):
    """A row with `tools`: both documents open with the declarations, and the chosen reply (a
    call) and the rejected one (a guess) score as the last reply of a tool chat does."""
    from test_tools import DEV, QUESTION, WEATHER

    tok = Tokenizer(tiny_dir)
    prompt = [{"role": "developer", "content": DEV}, {"role": "user", "content": QUESTION}]
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_current_weather", "arguments": {"location": "Tokyo"}},
            }
        ],
    }
    guess = {"role": "assistant", "content": "It is sunny in Tokyo."}
    s = _pair({"prompt": prompt, "chosen": [call], "rejected": [guess], "tools": [WEATHER]}, tok)
    for doc, reply in ((s.input_ids[: s.split], call), (s.input_ids[s.split :], guess)):
        alone = render(
            to_turns(Record("x", {"messages": [*prompt, reply], "tools": [WEATHER]})),
            tok,
            None,
            "last",
        )
        assert doc == alone.input_ids
    labels_c = _chat_tools([*prompt, call], tok)
    assert s.labels[: s.split] == labels_c
    assert "get_current_weather" in tok.decode(s.input_ids[: s.split], skip_special=False)


def _chat_tools(turns: list, tok) -> list[int]:
    from test_tools import WEATHER

    rec = Record("x", {"messages": turns, "tools": [WEATHER]})
    return render(to_turns(rec), tok, None, "last").labels
