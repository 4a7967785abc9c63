"""What `data check` and the drop/truncation notes say: every cut list says how many it left
off, and Pan & Scan crops are counted per image and named when they made a sample too long."""

from __future__ import annotations

import json

import numpy as np
from golden import check, relative
from PIL import Image
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from gemma3_tune.cli import main
from gemma3_tune.data import prepare
from gemma3_tune.data.settings import DataConfig
from gemma3_tune.data.tokenizer import Tokenizer
from gemma3_tune.model.checkpoint import read_config

SIZES = {"wide.png": (1100, 300), "tall.png": (320, 900), "square.png": (300, 300)}


def _chat(user, reply: str = "ok") -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    }


def _with_image(name: str, text: str = "what is it", reply: str = "ok") -> dict:
    return _chat([{"type": "image", "image": name}, {"type": "text", "text": text}], reply)


def _write(tmp_path, rows, recipe_extra: str, model_dir) -> str:
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, (w, h) in SIZES.items():
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(tmp_path / name)
    r = tmp_path / "r.yaml"
    r.write_text(
        f"model:\n  path: {model_dir}\ndata:\n  train: {tmp_path / 'd.jsonl'}\n"
        f"  image_root: {tmp_path}\n{recipe_extra}"
    )
    return str(r)


def _hf_crops(name: str) -> int:
    """Pan & Scan crops transformers' Gemma 3 processor makes of this image (defaults as ours)."""
    proc = Gemma3ImageProcessorPil(
        size={"height": 64, "width": 64},
        do_pan_and_scan=True,
        pan_and_scan_min_crop_size=256,
        pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2,
    )
    return int(proc(images=Image.new("RGB", SIZES[name]), return_tensors="np")["num_crops"][0])


def test_drop_list_says_how_many_it_left_off(tmp_path, tiny_dir, capsys):
    long = _chat("hi", "word " * 100)
    rows = [_chat(f"q{i}") for i in range(20)] + [long] * 16
    recipe = _write(tmp_path, rows, "  max_seq_len: 48\n  truncation: drop\n", tiny_dir)
    assert main(["data", "check", recipe]) == 0
    out = capsys.readouterr().out.splitlines()
    listed = [line for line in out if "tokens > max_seq_len 48" in line]
    assert len(listed) == 10 and listed[0].endswith("d.jsonl:21: 117 tokens > max_seq_len 48")
    assert out[out.index(listed[-1]) + 1] == "  ... and 6 more"


def test_notes_say_pan_and_scan_crops_made_the_sample_too_long(tmp_path, tiny_vision_dir):
    """tiny-vision: 16 soft tokens per view, + <start_of_image> and <end_of_image> = 18; the
    wide image is 1 + 4 crops = 5 views = 90 image tokens."""
    tok, cfg = Tokenizer(tiny_vision_dir), read_config(tiny_vision_dir)
    views = 1 + _hf_crops("wide.png")
    assert views == 5
    rows = [_chat("hi"), _with_image("wide.png", reply="word " * 60)]
    _write(tmp_path, rows, "", tiny_vision_dir)
    origin = f"{tmp_path / 'd.jsonl'}:2"
    crops = f"(wide.png: 5 views (4 Pan & Scan crops) = {views * 18} image tokens)"

    def notes(**settings) -> list[str]:
        dc = DataConfig(train=["d.jsonl"], pan_and_scan=True, num_proc=2, **settings)
        got = prepare.prepare(dc, tok.folder, cfg, tmp_path, 0).report
        golden = [[relative(n, tmp_path) for n in at] for at in (got.truncated_at, got.dropped_at)]
        check(f"test_data_report:crops {json.dumps(settings, sort_keys=True)}", golden)
        return got.truncated_at + got.dropped_at

    (alone,) = notes(max_seq_len=60)
    assert alone == (
        f"{origin}: its images alone take 90 tokens > max_seq_len 60 {crops}; raise"
        " data.max_seq_len or lower data.pan_and_scan_max_crops"
    )
    (cut,) = notes(max_seq_len=200)
    assert cut.startswith(f"{origin}: ") and cut.endswith(f" -> 200 tokens {crops}"), cut
    (dropped,) = notes(max_seq_len=200, truncation="drop")
    assert dropped.startswith(f"{origin}: ") and dropped.endswith(f"> max_seq_len 200 {crops}")


def test_data_check_counts_pan_and_scan_crops_per_image(tmp_path, tiny_vision_dir, capsys):
    order = ["wide.png", "tall.png", "square.png", "wide.png"]
    rows = [_with_image(name) for name in order]
    recipe = _write(tmp_path, rows, "  pan_and_scan: true\n  max_seq_len: 256\n", tiny_vision_dir)
    assert main(["data", "check", recipe, "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    crops = [_hf_crops(name) for name in order]  # 4, 3, 0, 4
    assert crops == [4, 3, 0, 4]
    summary = json.loads(out[-1])
    assert summary["samples"] == 4 and summary["images"] == 4
    assert (summary["cropped_images"], summary["crops"]) == (3, sum(crops))
    assert summary["crops_per_image"] == {"0": 1, "3": 1, "4": 2}
    at = next(i for i, line in enumerate(out) if line.startswith("pan & scan crops"))
    assert out[at : at + 4] == [
        f"pan & scan crops   3 of 4 images cropped, 11 crops (+{11 * 18} image tokens)",
        "  images by crops  1 with 0, 1 with 3, 2 with 4",
        "  wide.png: 4 crops",
        "  tall.png: 3 crops",
    ]
    assert not out[at + 4].startswith("  ")


def test_data_check_json_has_zero_crops_without_pan_and_scan(tmp_path, tiny_vision_dir, capsys):
    recipe = _write(tmp_path, [_with_image("wide.png")], "  max_seq_len: 256\n", tiny_vision_dir)
    assert main(["data", "check", recipe, "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    summary = json.loads(out[-1])
    assert (summary["samples"], summary["cropped_images"], summary["crops"]) == (1, 0, 0)
    assert not any(line.startswith("pan & scan crops") for line in out)
