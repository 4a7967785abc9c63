"""Image files are read as a viewer shows them: EXIF orientation applied (as PIL's own
`ImageOps.exif_transpose` and transformers' `load_image` do), 16-bit greyscale scaled to 8 bits
instead of clipped white."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageOps
from reference import hf_image_pixels
from transformers.image_utils import load_image as hf_load_image

from gemma3_tune.data import images
from gemma3_tune.data.records import Record
from gemma3_tune.data.sources import to_turns

SIZE = 64


def _noise(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _with_orientation(tmp_path, orientation: int, suffix: str):
    """A wide 1100x300 image stored with this EXIF orientation (6: a phone held upright)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    path = tmp_path / f"o{orientation}{suffix}"
    _noise(1100, 300).save(path, exif=exif)
    return path


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_is_applied_as_pil_and_transformers_do(tmp_path, orientation, suffix):
    path = _with_orientation(tmp_path, orientation, suffix)
    with Image.open(path) as im:
        upright = ImageOps.exif_transpose(im)
    got = images.preprocess(path, SIZE, pan_and_scan=True)  # [views, 3, S, S]
    want = images.preprocess(upright, SIZE, pan_and_scan=True)
    assert got.shape == want.shape
    assert torch.equal(got, want)
    hf = hf_image_pixels(
        hf_load_image(str(path)), SIZE, True
    )  # transformers: load_image, then the processor
    assert hf.shape == got.shape and (got - hf).abs().max().item() <= 1e-5
    # The data pipeline reserves tokens for as many views as preprocessing cuts, from the
    # upright size (Pan & Scan cuts a tall image into stacked crops, a wide one side by side).
    assert images.upright_size(path) == upright.size
    rec = Record("d.jsonl:1", {"messages": [
        {"role": "user", "content": [{"type": "image", "image": str(path)}]},
        {"role": "assistant", "content": "x"},
    ]})  # fmt: skip
    (ref,) = [
        p for t in to_turns(rec, pan_and_scan=True) for p in t.parts if not isinstance(p, str)
    ]
    assert ref.views == got.shape[0] == 1 + len(images.pan_and_scan_crops(upright))


def _ramp16() -> np.ndarray:
    return np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value once


def _as_8bit(pixels: torch.Tensor) -> np.ndarray:
    """[1, 3, S, S] normalised to [-1, 1] -> the 8-bit values they came from, [3, S, S]."""
    return ((pixels[0].double().numpy() + 1) / 2 * 255).round().astype(np.int64)


def _sixteen_bit(tmp_path, kind: str) -> tuple[Image.Image | object, np.ndarray]:
    """(image or file, the 8-bit values expected), by hand: v -> round(v / 257) for 16-bit
    data, v -> round(v * 255) for floats within [0, 1]."""
    v = _ramp16().astype(np.int64)
    by_257 = (v + 128) // 257  # round half up; 257 is odd, so no value sits on a half
    if kind == "png_I;16":
        Image.fromarray(_ramp16()).save(tmp_path / "g16.png")
        return tmp_path / "g16.png", by_257
    if kind == "I;16B":
        return Image.frombytes("I;16B", (256, 256), _ramp16().astype(">u2").tobytes()), by_257
    if kind == "I_16bit_range":
        return Image.fromarray(v.astype(np.int32), "I"), by_257
    if kind == "F_unit_range":
        k = np.arange(256 * 256) % 256
        return Image.fromarray((k / 255).astype(np.float32).reshape(256, 256), "F"), k.reshape(
            256, 256
        )
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["png_I;16", "I;16B", "I_16bit_range", "F_unit_range"])
def test_high_bit_depth_greyscale_is_scaled_to_8_bits(tmp_path, kind):
    image, want = _sixteen_bit(tmp_path, kind)
    if kind == "png_I;16":
        with Image.open(image) as im:
            assert im.mode == "I;16"  # how PIL opens a 16-bit greyscale PNG
    got = _as_8bit(images.preprocess(image, 256))  # 256 px: the resize is the identity
    assert got.shape == (3, 256, 256)
    assert (got == want[None]).all(), np.argwhere(got[0] != want)[:5]
    assert got.max() == 255 and (got == 255).mean() < 0.01  # not the all-white of a clip


def test_eight_bit_values_in_mode_I_stay_as_they_are(tmp_path):
    """Mode "I" has no bit depth: values up to 255 are taken as 8-bit, not divided by 257."""
    v = np.arange(256 * 256).reshape(256, 256) % 256
    got = _as_8bit(images.preprocess(Image.fromarray(v.astype(np.int32), "I"), 256))
    assert (got == v[None]).all()
    wide = Image.fromarray((v * 257).astype(np.int32), "I")  # the same ramp at 16 bits
    assert (_as_8bit(images.preprocess(wide, 256)) == v[None]).all()
