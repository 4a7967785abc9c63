"""The formats people bring: Alpaca rows, TRL's image placeholders with a top-level `images`
list, and `datasets.Image()` columns (bytes or paths). Each renders exactly as the same
conversation written in our `messages` form."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gemma3_tune.cli import main
from gemma3_tune.data.records import Record, SampleError
from gemma3_tune.data.sources import read_records, to_turns
from gemma3_tune.data.template import ImageRef, VisionTokens, render
from gemma3_tune.data.tokenizer import Tokenizer


def _msgs(*pairs, system=None):
    out = [{"role": "system", "content": system}] if system else []
    for u, a in pairs:
        out += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return {"messages": out}


def _ids(sample, tok, vision=None, base=Path(".")):
    return render(to_turns(Record("d:1", sample), base=base), tok, vision).input_ids


ALPACA = {
    "full": (
        {
            "instruction": "Translate to French.",
            "input": "Good morning",
            "output": "Bonjour",
            "system": "Be exact.",
            "history": [["Say hi", "Hi"]],
        },
        _msgs(
            ("Say hi", "Hi"), ("Translate to French.\nGood morning", "Bonjour"), system="Be exact."
        ),
    ),
    "no_input": (
        {"instruction": "Name a colour.", "input": "", "output": "Red"},
        _msgs(("Name a colour.", "Red")),
    ),
}


@pytest.mark.parametrize("case", list(ALPACA))
def test_alpaca_rows_render_as_messages(case, tiny_dir):
    """LLaMA-Factory's rule: the user turn is instruction + "\\n" + input; history pairs first."""
    alpaca, messages = ALPACA[case]
    tok = Tokenizer(tiny_dir)
    assert _ids(alpaca, tok) == _ids(messages, tok)


def test_alpaca_file_passes_data_check(tmp_path, tiny_dir, capsys):
    rows = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(1, i + 2)))} for i in range(20)]  # fmt: skip
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  path: {tiny_dir}\ndata:\n  train: {tmp_path / 'a.jsonl'}\n")
    assert main(["data", "check", str(recipe), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 20


def test_alpaca_without_output_is_one_line():
    with pytest.raises(SampleError, match=r"^d:1: alpaca 'output' is empty"):
        to_turns(Record("d:1", {"instruction": "x", "output": " "}))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    d = tmp_path_factory.mktemp("pics")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(d / name)
    return d


def _vision(model_dir):
    from gemma3_tune.model.checkpoint import read_config

    c = read_config(model_dir)
    return VisionTokens(c.image_token_id, c.boi_token_id, c.eoi_token_id, c.mm_tokens_per_image)


def test_trl_image_placeholders_take_the_images_list(pictures, tiny_vision_dir):
    trl = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Both?"}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
        ],
        "images": ["a.png", "b.jpg"],
    }  # fmt: skip
    explicit = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Both?"}, {"type": "image", "image": "b.jpg"}]},
            {"role": "assistant", "content": "Yes."},
        ]
    }  # fmt: skip
    tok, vis = Tokenizer(tiny_vision_dir), _vision(tiny_vision_dir)
    a = render(to_turns(Record("d:1", trl), base=pictures), tok, vis)
    b = render(to_turns(Record("d:1", explicit), base=pictures), tok, vis)
    assert a.input_ids == b.input_ids and a.labels == b.labels
    assert [Path(im.path).name for im in a.images] == ["a.png", "b.jpg"]  # in order


@pytest.mark.parametrize(
    "images, reason",
    [
        (["a.png"], "the sample's 'images' list has no image left for it"),
        (["a.png", "b.jpg", "a.png"], "3 image(s) in 'images' but only 2 {'type': 'image'} placeholder(s)"),
    ],
)  # fmt: skip
def test_trl_placeholder_count_mismatch_is_one_line(images, reason, pictures):
    trl = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "x"},
        ],
        "images": images,
    }  # fmt: skip
    with pytest.raises(SampleError) as e:
        to_turns(Record("d.jsonl:3", trl), base=pictures)
    assert str(e.value).startswith("d.jsonl:3: ") and reason in str(e.value)


def test_datasets_image_column_bytes_and_paths(pictures, tiny_vision_dir, tmp_path, monkeypatch):
    """A `save_to_disk` folder whose `images` column is `Sequence(datasets.Image())`, one row
    given bytes (how Hub datasets store images) and one a path: both read, the bytes written
    once to the cache (the same bytes, named by their hash), the pixels as from the file."""
    import datasets

    from gemma3_tune.data.images import preprocess

    monkeypatch.setenv("GEMMA3_TUNE_DATA_CACHE", str(tmp_path / "cache"))
    raw = (pictures / "b.jpg").read_bytes()
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Noise."}]},
    ]
    features = datasets.Features(
        {
            "messages": [
                {
                    "role": datasets.Value("string"),
                    "content": [
                        {"type": datasets.Value("string"), "text": datasets.Value("string")}
                    ],
                }
            ],
            "images": datasets.Sequence(datasets.Image()),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "messages": [msgs, msgs],
            "images": [[{"bytes": raw, "path": None}], [str(pictures / "a.png")]],
        },
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    records = list(read_records(tmp_path / "ds"))
    tok, vis = Tokenizer(tiny_vision_dir), _vision(tiny_vision_dir)
    first, second = (to_turns(r, base=tmp_path / "ds") for r in records)
    stored = Path(next(p for p in first[0].parts if isinstance(p, ImageRef)).path)
    assert stored.read_bytes() == raw and stored.parent == tmp_path / "cache" / "images"
    size = 64
    assert np.array_equal(preprocess(stored, size), preprocess(pictures / "b.jpg", size))
    # save_to_disk embeds the file given by path: its bytes, stored the same way
    again = Path(next(p for p in second[0].parts if isinstance(p, ImageRef)).path)
    assert again.read_bytes() == (pictures / "a.png").read_bytes()
    # a path dict, as a JSON line holds one: the file itself, nothing written
    record = Record("d:1", {"messages": msgs, "images": [{"bytes": None, "path": "a.png"}]})
    ref = next(p for p in to_turns(record, base=pictures)[0].parts if isinstance(p, ImageRef))
    assert Path(ref.path) == pictures / "a.png"
    assert render(first, tok, vis).input_ids == render(second, tok, vis).input_ids


def test_datasets_image_bytes_through_data_check(pictures, tiny_vision_dir, tmp_path, capsys):
    """The same column as a Parquet file, through `data check`: accepted and counted."""
    import datasets

    buf = io.BytesIO()
    Image.open(pictures / "a.png").save(buf, format="PNG")
    ds = datasets.Dataset.from_dict(
        {
            "conversations": [
                [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "Noise."}]
            ]
            * 3,
            "images": [[{"bytes": buf.getvalue(), "path": None}]] * 3,
        },
        features=datasets.Features(
            {
                "conversations": [
                    {"from": datasets.Value("string"), "value": datasets.Value("string")}
                ],
                "images": datasets.Sequence(datasets.Image()),
            }
        ),
    )
    ds.to_parquet(str(tmp_path / "d.parquet"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model:\n  path: {tiny_vision_dir}\ndata:\n  train: {tmp_path / 'd.parquet'}\n"
        f"  cache_dir: {tmp_path / 'c'}\n"
    )
    assert main(["data", "check", str(recipe), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["samples"] == 3 and report["images"] == 3
    assert len(list((tmp_path / "c" / "images").iterdir())) == 1  # one image, written once
