"""Preprocessing equals transformers' Gemma3ImageProcessorPil (within 1e-5), with Pan & Scan."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from reference import hf_image_pixels

from gemma3_tune.data.images import ImageError, load_image, preprocess


def _image(mode: str, w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    if mode == "RGB":
        return Image.fromarray(rgba[..., :3], "RGB")
    if mode == "RGBA":
        return Image.fromarray(rgba, "RGBA")
    if mode == "L":
        return Image.fromarray(rgba[..., 0], "L")
    if mode == "P":
        return Image.fromarray(rgba[..., :3], "RGB").quantize(colors=64)
    raise ValueError(mode)


SHAPES = {
    "square": (300, 300),
    "wide": (1100, 300),
    "very_wide": (2000, 400),
    "tall": (320, 900),
    "tiny": (7, 5),
}


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("pas", [False, True], ids=["plain", "pan_and_scan"])
def test_matches_transformers(mode, shape, pas):
    img = _image(mode, *SHAPES[shape])
    want = hf_image_pixels(img, 64, pas)
    got = preprocess(img, 64, pan_and_scan=pas)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


def test_pan_and_scan_crop_counts():
    assert preprocess(_image("RGB", 1100, 300), 32, pan_and_scan=True).shape[0] == 1 + 4
    assert preprocess(_image("RGB", 320, 900), 32, pan_and_scan=True).shape[0] == 1 + 3
    assert preprocess(_image("RGB", 300, 300), 32, pan_and_scan=True).shape[0] == 1


def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    import gemma3_tune.data.images as images

    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)
    p = tmp_path / "big.png"
    _image("RGB", 200, 200).save(p)
    with pytest.raises(ImageError, match="image too large"):
        load_image(p)


def test_corrupt_image_is_a_clear_error(tmp_path):
    p = tmp_path / "broken.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(p)
