"""Prompt-only data for distillation: the teacher's batched replies equal the unbatched
decoder's, a killed fill resumes, prepared rows with the replies equal a file with the replies
written out, the cache key follows the replies, seeded sampling, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from gemma3_tune.data import prepare, sample_table
from gemma3_tune.data.answers import (
    AnswerStore,
    answer_prompts,
    find_prompts,
    prompt_key,
    prompt_seed,
)
from gemma3_tune.data.dataset import DataErrors, vision_tokens
from gemma3_tune.data.images import preprocess
from gemma3_tune.data.prepared import Prepared
from gemma3_tune.data.settings import DataConfig
from gemma3_tune.data.tokenizer import Tokenizer
from gemma3_tune.model.checkpoint import load_model, read_config
from gemma3_tune.model.generate import generate

N_NEW = 12

# Rows of every prompt-only kind, of different lengths, a whole chat, and a repeated prompt.
ROWS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "what is two plus two"},
        ]
    },
    {"conversations": [{"from": "human", "value": "hi"}]},
    {
        "prompt": [
            {
                "role": "user",
                "content": "tell me a long story about a cat and a dog in the park today",
            }
        ]
    },
    {"prompt": "x"},
    {
        "messages": [
            {"role": "user", "content": "name three colours"},
            {"role": "assistant", "content": "red, green, blue"},
            {"role": "user", "content": "three more"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "a whole chat"},
            {"role": "assistant", "content": "trained as written"},
        ]
    },
    {"prompt": "x"},  # the same prompt as line 4: answered once
]
PROMPT_LINES = [1, 2, 3, 4, 5]  # lines of ROWS holding a new prompt


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _written_out(row: dict, reply: str | None) -> dict:
    """The row as a user would write it with the reply: a ShareGPT gpt turn, else an
    assistant message (TRL prompts become messages rows)."""
    if "conversations" in row:
        return {"conversations": [*row["conversations"], {"from": "gpt", "value": reply}]}
    msgs = row.get("messages") or row["prompt"]
    msgs = [{"role": "user", "content": msgs}] if isinstance(msgs, str) else msgs
    if msgs[-1]["role"] != "user":
        return row
    return {"messages": [*msgs, {"role": "assistant", "content": reply}]}


def _teacher(tiny_dir: Path):
    """The tiny random model with <end_of_turn>'s (tied) embedding scaled up, so that two of
    the five greedy replies stop (at once: an empty reply) and three hit N_NEW tokens."""
    model = load_model(tiny_dir).eval()
    with torch.no_grad():
        model.text_model.embed_tokens.weight[Tokenizer(tiny_dir).end_of_turn] *= 2.5
    return model


def _reference(model, tok: Tokenizer, ids: list[int], **kw) -> list[int]:
    """The unbatched KV-cache decoder, one prompt at a time."""
    stream = generate(
        model, torch.tensor([ids]), max_new_tokens=N_NEW, stop_ids=tok.stop_ids(), **kw
    )
    return list(stream)


@pytest.fixture
def prompts(tmp_path, tiny_dir):
    data = _jsonl(tmp_path / "data" / "prompts.jsonl", ROWS)
    tok = Tokenizer(tiny_dir)
    found = find_prompts(DataConfig(train=[str(data)]), tok, None, tmp_path)
    return tok, found, data


def _entries(store: AnswerStore) -> dict[str, tuple[str, list[int]]]:
    return {k: (e["reply"], e["ids"]) for k, e in store.entries().items()}


def test_batched_teacher_replies_equal_the_unbatched_decoder(prompts, tiny_dir, tmp_path, capsys):
    tok, found, data = prompts
    assert [p.origin for p in found] == [f"{data}:{i}" for i in PROMPT_LINES]
    assert len({len(p.ids) for p in found}) == 5  # five lengths: ragged batches
    model = _teacher(tiny_dir)
    store = AnswerStore(tmp_path / "teacher")
    assert answer_prompts(model, tok, found, store, max_new_tokens=N_NEW, batch_size=2) == 5
    want = {p.key: _reference(model, tok, p.ids) for p in found}
    got = _entries(store)
    assert {k: ids for k, (_, ids) in got.items()} == want
    assert {k: text for k, (text, _) in got.items()} == {k: tok.decode(v) for k, v in want.items()}
    cut = sum(len(v) == N_NEW for v in want.values())
    assert cut == 3  # some replies stopped, some hit the limit
    assert [e["stopped"] for e in store.entries().values()] == [
        len(want[p.key]) < N_NEW for p in sorted(found, key=lambda p: -len(p.ids))
    ]
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"teacher answered 5 prompts ({cut} hit distill.generate.max_new_tokens={N_NEW}:"
        " raise it if replies are cut)"
    )
    assert answer_prompts(model, tok, found, store, max_new_tokens=N_NEW) == 0  # all stored


def test_a_killed_fill_resumes_with_only_the_missing_prompts(prompts, tiny_dir, tmp_path):
    tok, found, _ = prompts
    model = _teacher(tiny_dir)
    store = AnswerStore(tmp_path / "teacher")
    answer_prompts(model, tok, found, store, max_new_tokens=N_NEW, batch_size=2)
    whole = _entries(store)
    lines = store.path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 5
    torn = b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2]  # killed inside line 4
    store.path.write_bytes(torn)
    assert len(store.load()) == 3  # the torn line is ignored
    assert answer_prompts(model, tok, found, store, max_new_tokens=N_NEW, batch_size=2) == 2
    assert _entries(store) == whole
    text = store.path.read_text()
    assert text.endswith("\n") and len([json.loads(x) for x in text.splitlines()]) == 5
    store.path.write_text(text.rstrip("\n"))  # a whole last line, without its newline: kept
    store.append([{"key": "k", "reply": "r", "ids": []}])
    assert len(store.load()) == 6 and len(store.path.read_text().splitlines()) == 6


REPLIES = {
    1: "  four\n",
    2: "hello there",
    3: "once upon a time",
    4: "y",
    5: "cyan, magenta, black",
}


def _store_with(folder: Path, found, replies: dict[int, str]) -> AnswerStore:
    """A store holding `replies` (by the prompt's line in ROWS), as a teacher would write it."""
    store = AnswerStore(folder)
    store.append(
        [
            {"key": p.key, "reply": replies[int(p.origin.rsplit(":", 1)[1])], "ids": []}
            for p in found
        ]
    )
    return store


def _reply_rows(replies: dict[int, str]) -> list[dict]:
    line = {4: 4, 7: 4}  # line 7 repeats line 4's prompt
    return [_written_out(r, replies.get(line.get(i, i))) for i, r in enumerate(ROWS, 1)]


def _columns(p: Prepared) -> tuple[list, list]:
    samples = p.train_rows.samples
    return samples["input_ids"], samples["labels"]


@pytest.fixture
def prepared(tmp_path, tiny_dir, monkeypatch):
    """prepare() of a train and an eval file, by 2 worker processes over several parts."""
    monkeypatch.setattr(sample_table, "CHUNK_BYTES", 150)
    cfg = read_config(tiny_dir)

    def run(train: Path, evals: Path, answers: AnswerStore | None = None, found=None):
        dc = DataConfig(
            train=[str(train)], eval=[str(evals)], num_proc=2, cache_dir=str(tmp_path / "cache")
        )
        return prepare.prepare(dc, tiny_dir, cfg, tmp_path, 0, answers=answers, prompts=found)

    return run


def _no_paths(summary: dict) -> dict:
    """A report's summary without its sources' paths (the two runs read different files)."""
    sources = [{k: v for k, v in s.items() if k != "path"} for s in summary["sources"]]
    return {**summary, "sources": sources}


def test_prepared_rows_with_answers_equal_the_replies_written_out(prompts, prepared, tmp_path):
    tok, found, data = prompts
    evals = _jsonl(tmp_path / "data" / "held.jsonl", [ROWS[1], ROWS[4]])
    assert len(sample_table.parts(data, 0)) > 2  # the workers get the answers, not only the caller
    store = _store_with(tmp_path / "teacher", found, REPLIES)
    got = prepared(data, evals, store)
    train_ref = _jsonl(tmp_path / "ref" / "prompts.jsonl", _reply_rows(REPLIES))
    eval_ref = _jsonl(tmp_path / "ref" / "held.jsonl", [_reply_rows(REPLIES)[i] for i in (1, 4)])
    want = prepared(train_ref, eval_ref)
    assert _columns(got) == _columns(want)
    assert got.digest() == want.digest()
    assert _no_paths(got.report.summary()) == _no_paths(want.report.summary())
    assert got.report.samples == 7 and got.report.eval_samples == 2
    ids, labels = _columns(got)
    # line 1: the trained tokens are the reply (stripped, as written replies are) and its end
    trained = [t for t, y in zip(ids[0], labels[0], strict=True) if y != -100]
    assert trained == tok.encode("four") + [tok.end_of_turn]


def test_the_cache_key_follows_the_replies(prompts, prepared, tmp_path):
    _, found, data = prompts
    evals = _jsonl(tmp_path / "data" / "held.jsonl", [ROWS[5]])
    first = prepared(data, evals, _store_with(tmp_path / "a", found, REPLIES))
    assert first.built and not prepared(data, evals, AnswerStore(tmp_path / "a")).built
    reordered = AnswerStore(tmp_path / "a2")
    reordered.append(list(reversed(AnswerStore(tmp_path / "a").entries().values())))
    assert not prepared(data, evals, reordered).built  # the same replies, in another order
    other = prepared(data, evals, _store_with(tmp_path / "b", found, {**REPLIES, 3: "the end"}))
    assert other.built  # another teacher: other rows
    a, b = _columns(first)[0], _columns(other)[0]
    assert [i for i in range(len(a)) if a[i] != b[i]] == [2]  # only line 3's sample
    assert not prepared(data, evals, AnswerStore(tmp_path / "a")).built


def test_scoped_to_the_data_s_prompts_the_key_ignores_other_replies(prompts, prepared, tmp_path):
    tok, found, data = prompts
    evals = _jsonl(tmp_path / "data" / "held.jsonl", [ROWS[5]])
    store = _store_with(tmp_path / "a", found, REPLIES)
    assert prepared(data, evals, store, found).built
    store.append([{"key": prompt_key([1, 2, 3], []), "reply": "for other data", "ids": []}])
    assert not prepared(data, evals, store, found).built  # the same replies for this data
    assert prepared(data, evals, store).built  # unscoped: the whole store is hashed
    store.append([{"key": found[0].key, "reply": "a second reply", "ids": []}])
    assert not prepared(data, evals, store, found).built  # the first reply of a key is kept
    assert store.load()[found[0].key] == REPLIES[1]


def test_sampling_is_seeded_per_prompt_and_differs_from_greedy(prompts, tiny_dir, tmp_path):
    tok, found, _ = prompts
    model = _teacher(tiny_dir)

    def fill(name: str, **kw) -> dict:
        store = AnswerStore(tmp_path / name)
        answer_prompts(model, tok, found, store, max_new_tokens=N_NEW, progress=False, **kw)
        return {k: ids for k, (_, ids) in _entries(store).items()}

    greedy = fill("greedy", batch_size=5)
    sampled = fill("t1", temperature=1.0, seed=3, batch_size=2)
    assert fill("t1-again", temperature=1.0, seed=3, batch_size=5) == sampled  # any batching
    for p in found:  # each prompt draws from its own generator, as generate does alone
        want = _reference(model, tok, p.ids, temperature=1.0, seed=prompt_seed(3, p.key))
        assert sampled[p.key] == want
        assert sampled[p.key] != greedy[p.key]
    other = fill("t1-seed4", temperature=1.0, seed=4, batch_size=5)
    assert all(other[p.key] != sampled[p.key] for p in found)


def test_a_prompt_with_an_image_is_answered_with_its_pixels(tmp_path, tiny_vision_dir):
    """One at a time, with its pixels; a wide image with its Pan & Scan crops cut as the data
    settings (not preprocess's defaults) say, or the views would not match the image tokens."""
    Image.new("RGB", (40, 30), (200, 40, 40)).save(tmp_path / "red.png")
    Image.new("RGB", (240, 40), (40, 40, 200)).save(tmp_path / "wide.png")
    wide = [{"type": "image", "image": "wide.png"}, {"type": "text", "text": "colour?"}]
    trl_image = [{"type": "image"}, {"type": "text", "text": "?"}]
    rows = [
        {"prompt": [{"role": "user", "content": trl_image}], "images": ["red.png"]},
        {"messages": [{"role": "user", "content": wide}]},
        {"prompt": "no image here"},
    ]
    data = _jsonl(tmp_path / "prompts.jsonl", rows)
    tok, cfg = Tokenizer(tiny_vision_dir), read_config(tiny_vision_dir)
    crops = {"min_crop_size": 32, "max_crops": 3}
    settings = {
        "cache_dir": str(tmp_path / "cache"),
        "pan_and_scan": True,
        "pan_and_scan_min_crop_size": 32,
        "pan_and_scan_max_crops": 3,
    }
    dc = DataConfig(train=[str(data)], **settings)
    found = find_prompts(dc, tok, vision_tokens(cfg), tmp_path)
    assert [[im.path for im in p.images] for p in found] == [
        [str(tmp_path / "red.png")],
        [str(tmp_path / "wide.png")],
        [],
    ]
    assert found[1].images[0].views > 1  # crops, under the data settings
    model = load_model(tiny_vision_dir).eval()
    store = AnswerStore(tmp_path / "teacher")
    assert answer_prompts(model, tok, found, store, max_new_tokens=N_NEW, batch_size=4) == 3
    for p in found[:2]:
        pixels = preprocess(p.images[0].path, cfg.vision.image_size, True, **crops)
        assert len(pixels) == p.images[0].views
        want = _reference(model, tok, p.ids, pixel_values=pixels)
        assert store.entries()[p.key]["ids"] == want
    got = prepare.prepare(dc, tiny_vision_dir, cfg, tmp_path, 0, answers=store)
    replies = [store.load()[p.key] for p in found]
    red = [{"type": "image", "image": "red.png"}, {"type": "text", "text": "?"}]
    ref = [
        {"messages": [{"role": "user", "content": red}, {"role": "assistant", "content": replies[0]}]},
        {"messages": [{"role": "user", "content": wide}, {"role": "assistant", "content": replies[1]}]},
        {"messages": [{"role": "user", "content": "no image here"},
                      {"role": "assistant", "content": replies[2]}]},
    ]  # fmt: skip
    ref_cfg = DataConfig(train=[str(_jsonl(tmp_path / "ref.jsonl", ref))], **settings)
    want = prepare.prepare(ref_cfg, tiny_vision_dir, cfg, tmp_path, 0)
    assert _columns(got) == _columns(want)
    assert got.report.images == 2


def _errors(tmp_path: Path, tiny_dir: Path, rows: list[dict], answers=None) -> list[str]:
    data = _jsonl(tmp_path / "bad.jsonl", rows)
    dc = DataConfig(train=[str(data)], cache_dir=str(tmp_path / "cache"), num_proc=1)
    with pytest.raises(DataErrors) as e:
        prepare.prepare(dc, tiny_dir, read_config(tiny_dir), tmp_path, 0, answers=answers)
    return [str(x) for x in e.value.errors]


def test_prompts_without_a_teacher_are_one_line_errors_naming_distill(tmp_path, tiny_dir):
    rows = [
        {"messages": [{"role": "user", "content": "a question"}]},
        {"conversations": [{"from": "human", "value": "a question"}]},
        {"prompt": "a question"},
        {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}]},
        {"instruction": "a question", "output": ""},
        {"messages": [{"role": "system", "content": "only a system message"}]},
    ]  # fmt: skip
    got = _errors(tmp_path, tiny_dir, rows)
    data = tmp_path / "bad.jsonl"
    hint = (
        "a distill: section with a teacher can answer it (distill.teacher), or objective: grpo"
        " trains on prompts with reward functions (rl.rewards)"
    )
    ends = f"no assistant reply to train on (the conversation ends on the user's turn: {hint})"
    prompt_row = f"a 'prompt'-only row has no assistant reply to train on; {hint}"
    assert got == [
        f"{data}:1: {ends}",
        f"{data}:2: {ends}",
        f"{data}:3: {prompt_row}",
        f"{data}:4: {prompt_row}",  # a TRL prompt is only ever a prompt, never a chat to train on
        f"{data}:5: alpaca 'output' is empty: no reply to train on (for a distill: teacher to"
        ' answer it, give the row as {"prompt": INSTRUCTION})',
        f"{data}:6: no assistant reply to train on",
    ]


def test_with_a_teacher_a_missing_reply_and_a_bad_prompt_are_one_line_errors(tmp_path, tiny_dir):
    rows = [
        {"messages": [{"role": "user", "content": "never answered"}]},
        {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"prompt": "a question", "completion": "its answer"},
    ]
    got = _errors(tmp_path, tiny_dir, rows, AnswerStore(tmp_path / "empty-teacher"))
    data = tmp_path / "bad.jsonl"
    assert got == [
        f"{data}:1: no reply from the teacher for this prompt",
        f"{data}:2: 'prompt' must end on a user message (TRL prompt-only); put whole"
        " conversations under 'messages'",
    ]  # row 3, TRL's prompt-completion, needs no teacher: it trains on its completion
