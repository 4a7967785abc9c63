"""Image preprocessing for Gemma 3's SigLIP: RGB, optional Pan & Scan crops, resize, normalise.

The output equals transformers' `Gemma3ImageProcessorPil` (same tensors, same order):
- an image file is opened upright, as transformers' `load_image` opens it: its EXIF
  orientation (a phone photo stored sideways with orientation 6) is applied by PIL's
  `ImageOps.exif_transpose`, so training sees what a viewer shows;
- greyscale deeper than 8 bits (16-bit PNGs and TIFFs: PIL modes "I;16*", "I", "F") is scaled
  to 8 bits rather than clipped (PIL's own `convert("RGB")` turns every value over 255 white);
- convert to RGB, compositing transparency onto white;
- Pan & Scan (optional): a wide (tall) image whose aspect ratio is at least `min_ratio` is also
  cut into 2..`max_crops` side-by-side (stacked) crops of at least `min_crop_size` pixels;
  the full image comes first, then its crops;
- resize each to `image_size` x `image_size` (PIL bilinear), scale to [0, 1], normalise with
  mean 0.5 and std 0.5 to [-1, 1].

Every image file goes through `open_rgb` (pixels) or `image_views` (the count of views the
data pipeline reserves tokens for, from the upright size): the two cannot disagree.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

MAX_IMAGE_PIXELS = 64_000_000  # refuse larger images (decompression bombs) with a clear error
PREPROCESS_VERSION = 2  # bump when preprocess() changes pixels of a file (2: EXIF, 16-bit)
SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that transpose or rotate by 90 degrees

T = TypeVar("T")


class ImageError(ValueError):
    """An image that cannot be used; the message says why."""


def to_8bit(image: Image.Image) -> Image.Image:
    """Greyscale deeper than 8 bits -> mode "L"; any other image unchanged.

    - "I;16", "I;16B", "I;16L", "I;16N" (16-bit, how PIL opens 16-bit PNGs and TIFFs):
      v -> round(v / 257), so 0..65535 maps onto 0..255 exactly (65535 -> 255, 257 -> 1).
    - "I" (32-bit integers) carries no bit depth, so the largest value decides: up to 255 the
      values are taken as 8-bit, up to 65535 as 16-bit (v / 257), beyond that as 32-bit
      (v * 255 / (2**31 - 1)); negative values become 0.
    - "F" (32-bit floats): values within [0, 1] are taken as intensities (v * 255); otherwise
      the rule for "I".
    """
    mode = image.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return image
    v = np.asarray(image).astype(np.float64)  # [H, W]
    top = float(v.max()) if v.size else 0.0
    if mode.startswith("I;16"):
        scale = 255 / 65535
    elif mode == "F" and top <= 1.0:
        scale = 255.0
    elif top <= 255:
        scale = 1.0
    elif top <= 65535:
        scale = 255 / 65535
    else:
        scale = 255 / (2**31 - 1)
    return Image.fromarray(np.clip(np.floor(v * scale + 0.5), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, transparency composited onto white, high-bit greyscale scaled (`to_8bit`)."""
    image = to_8bit(image)
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def pan_and_scan_boxes(
    width: int, height: int, min_crop_size: int = 256, max_crops: int = 4, min_ratio: float = 1.2
) -> list[tuple[int, int, int, int]]:
    """The (left, top, right, bottom) boxes of the crops Pan & Scan adds for a wide or tall
    image of this size ([] when it does not apply)."""
    if width >= height:
        if width / height < min_ratio:
            return []
        n_w = int(math.floor(width / height + 0.5))  # round half up
        n_w = min(int(math.floor(width / min_crop_size)), n_w)
        n_w, n_h = min(max_crops, max(2, n_w)), 1
    else:
        if height / width < min_ratio:
            return []
        n_h = int(math.floor(height / width + 0.5))
        n_h = min(int(math.floor(height / min_crop_size)), n_h)
        n_w, n_h = 1, min(max_crops, max(2, n_h))
    crop_w, crop_h = int(math.ceil(width / n_w)), int(math.ceil(height / n_h))
    if min(crop_w, crop_h) < min_crop_size:
        return []
    # Clipped at the border (numpy slicing does; PIL's crop would pad with black).
    return [
        (left, top, min(left + crop_w, width), min(top + crop_h, height))
        for top in (crop_h * i for i in range(n_h))
        for left in (crop_w * i for i in range(n_w))
    ]


def pan_and_scan_crops(
    image: Image.Image, min_crop_size: int = 256, max_crops: int = 4, min_ratio: float = 1.2
) -> list[Image.Image]:
    """The extra crops Pan & Scan adds for a wide or tall image ([] when it does not apply)."""
    boxes = pan_and_scan_boxes(*image.size, min_crop_size, max_crops, min_ratio)
    return [image.crop(box) for box in boxes]


def _normalise(image: Image.Image, size: int) -> torch.Tensor:
    resized = image.resize((size, size), resample=Image.Resampling.BILINEAR)
    arr = (np.asarray(resized).astype(np.float64) * (1 / 255)).astype(np.float32)  # [S, S, 3]
    arr = (arr - 0.5) / 0.5
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # [3, S, S]


def preprocess(
    image: Image.Image | str | os.PathLike,
    image_size: int,
    pan_and_scan: bool = False,
    min_crop_size: int = 256,
    max_crops: int = 4,
    min_ratio: float = 1.2,
) -> torch.Tensor:
    """One image -> `[n, 3, image_size, image_size]`: the image, then its Pan & Scan crops.
    A path is opened upright (`open_rgb`); a PIL image is taken as it is, orientation included."""
    img = open_rgb(image) if isinstance(image, str | os.PathLike) else to_rgb(image)
    views = [img] + (
        pan_and_scan_crops(img, min_crop_size, max_crops, min_ratio) if pan_and_scan else []
    )
    return torch.stack([_normalise(v, image_size) for v in views])


def _with_image(path: str | os.PathLike, use: Callable[[Image.Image], T]) -> T:
    """`use(image)` on the opened (not yet decoded) file, with PIL's failures and images over
    MAX_IMAGE_PIXELS turned into one-line ImageErrors."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    too_large = (
        f"image too large: {path} ({{}}; over {MAX_IMAGE_PIXELS:,} pixels); downscale it first"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit is lower
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:  # read from the header, before decoding
                    raise ImageError(too_large.format(f"{w}x{h}"))
                return use(im)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(too_large.format("PIL refuses it")) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL's ways to say "corrupt"
        raise ImageError(f"cannot read image {path}: {e}") from None


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file, upright: its EXIF orientation applied (PIL's
    `ImageOps.exif_transpose`, as transformers' `load_image`); mode as stored."""
    return _with_image(path, ImageOps.exif_transpose)


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """An image file as preprocessing sees it: upright, 8-bit RGB (`load_image`, `to_rgb`)."""
    return to_rgb(load_image(path))


def _upright_size(image: Image.Image) -> tuple[int, int]:
    # The orientation exif_transpose applies (EXIF, else XMP), read without decoding the
    # pixels where the format allows (PNG keeps its eXIf chunk anywhere, so PIL decodes it).
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    w, h = image.size
    return (h, w) if orientation in SWAPS_SIDES else (w, h)


def upright_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the image file once turned upright, as `load_image` returns it."""
    return _with_image(path, _upright_size)


def image_views(
    path: str | os.PathLike,
    pan_and_scan: bool = False,
    min_crop_size: int = 256,
    max_crops: int = 4,
    min_ratio: float = 1.2,
) -> int:
    """How many views `preprocess(path, ...)` gives: 1, plus the Pan & Scan crops of the
    upright image. Checks the file opens and is not too large, without decoding its pixels
    (except a PNG's when Pan & Scan needs its orientation)."""
    if not pan_and_scan:  # one view whichever way up: the header alone checks the file
        _with_image(path, lambda im: im.size)
        return 1
    return 1 + len(pan_and_scan_boxes(*upright_size(path), min_crop_size, max_crops, min_ratio))
