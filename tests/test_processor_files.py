"""Every multimodal folder we write opens with transformers' AutoProcessor, which processes an
image as our own preprocessing does (issue 25, item 8)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import transformers
from PIL import Image
from trainutil import colour_set, write_recipe

from gemma3_tune.cli import main
from gemma3_tune.data.images import preprocess

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _image() -> Image.Image:
    """Noise, not square and not the model's size: a resize that could come out differently."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (50, 83, 3), dtype=np.uint8))


def check_auto_processor(folder: Path) -> None:
    """AutoProcessor loads `folder`; one image + text gives the config's soft-token count and
    image size, and pixels equal gemma3_tune.data.images.preprocess."""
    cfg = json.loads((folder / "config.json").read_text())
    m, size = cfg["mm_tokens_per_image"], cfg["vision_config"]["image_size"]
    assert m != 256  # tiny-vision: the processor's default would be wrong
    proc = transformers.AutoProcessor.from_pretrained(str(folder))
    assert type(proc).__name__ == "Gemma3Processor"
    image = _image()
    out = proc(images=[image], text="<start_of_image> What colour is this?", return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    assert ids.count(cfg["image_token_id"]) == m
    assert ids.count(cfg["boi_token_id"]) == 1 and ids.count(cfg["eoi_token_id"]) == 1
    assert tuple(out["pixel_values"].shape) == (1, 3, size, size)
    ours = preprocess(image, size)  # [1, 3, size, size]
    assert (out["pixel_values"] - ours).abs().max().item() < 1e-6


def test_init_model_vision_folder_opens_with_auto_processor(tiny_vision_dir, tiny_dir):
    check_auto_processor(tiny_vision_dir)
    assert not any((tiny_dir / f).exists() for f in PROCESSOR_FILES)  # text-only: no processor


def test_merged_export_of_a_base_without_processor_files_gets_them(tiny_vision_dir, tmp_path):
    """A base written before this fix (no processor files, no named image tokens in
    tokenizer_config.json) exports to a folder AutoProcessor opens."""
    base = tmp_path / "base"
    shutil.copytree(tiny_vision_dir, base)
    for name in PROCESSOR_FILES:
        (base / name).unlink(missing_ok=True)
    tok_cfg = json.loads((base / "tokenizer_config.json").read_text())
    for key in ("boi_token", "eoi_token", "image_token"):
        tok_cfg.pop(key, None)
    (base / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    out = tmp_path / "merged"
    assert main(["export", str(base), "--out", str(out), "--merge", "--dtype", "float32"]) == 0
    check_auto_processor(out)


def test_export_keeps_the_processor_files_a_base_ships(tiny_vision_dir, tmp_path):
    """Real checkpoints ship their processor files: copied byte for byte, never rewritten."""
    base = tmp_path / "base"
    shutil.copytree(tiny_vision_dir, base)
    shipped = {
        "image_processor_type": "Gemma3ImageProcessor",
        "size": {"height": 64, "width": 64},
        "do_pan_and_scan": True,  # a value we would not write
    }
    (base / "preprocessor_config.json").write_text(json.dumps(shipped, indent=4))
    (base / "processor_config.json").write_text('{"image_seq_length": 16}')
    out = tmp_path / "merged"
    assert main(["export", str(base), "--out", str(out), "--merge", "--dtype", "float32"]) == 0
    for name in PROCESSOR_FILES:
        assert (out / name).read_bytes() == (base / name).read_bytes()
    proc = transformers.AutoProcessor.from_pretrained(str(out))
    assert proc.image_processor.do_pan_and_scan is True


def test_full_sft_model_folder_opens_with_auto_processor(tiny_vision_dir, tmp_path):
    """A full-SFT run's model/ is a whole model folder: it gets the processor files too."""
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_vision_dir, colour_set(tmp_path / "img", 4, seed=3),
        tmp_path / "run", method="full", training__max_steps=1,
    )  # fmt: skip
    assert main(["train", str(recipe)]) == 0
    check_auto_processor(tmp_path / "run" / "model")
