"""Image preprocessing for Gemma 3's SigLIP: RGB, optional Pan & Scan crops, resize, normalise.

The output equals transformers' `Gemma3ImageProcessorPil` (same tensors, same order):
- convert to RGB, compositing transparency onto white;
- Pan & Scan (optional): a wide (tall) image whose aspect ratio is at least `min_ratio` is also
  cut into 2..`max_crops` side-by-side (stacked) crops of at least `min_crop_size` pixels;
  the full image comes first, then its crops;
- resize each to `image_size` x `image_size` (PIL bilinear), scale to [0, 1], normalise with
  mean 0.5 and std 0.5 to [-1, 1].
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MAX_IMAGE_PIXELS = 64_000_000  # refuse larger images (decompression bombs) with a clear error


class ImageError(ValueError):
    """An image that cannot be used; the message says why."""


def to_rgb(image: Image.Image) -> Image.Image:
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def pan_and_scan_crops(
    image: Image.Image, min_crop_size: int = 256, max_crops: int = 4, min_ratio: float = 1.2
) -> list[Image.Image]:
    """The extra crops Pan & Scan adds for a wide or tall image ([] when it does not apply)."""
    width, height = image.size
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
    crops = []
    for top in (crop_h * i for i in range(n_h)):
        for left in (crop_w * i for i in range(n_w)):
            # Clip at the border (numpy slicing does; PIL's crop would pad with black).
            crops.append(
                image.crop((left, top, min(left + crop_w, width), min(top + crop_h, height)))
            )
    return crops


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
    """One image -> `[n, 3, image_size, image_size]`: the image, then its Pan & Scan crops."""
    img = load_image(image) if isinstance(image, str | os.PathLike) else image
    img = to_rgb(img)
    views = [img] + (
        pan_and_scan_crops(img, min_crop_size, max_crops, min_ratio) if pan_and_scan else []
    )
    return torch.stack([_normalise(v, image_size) for v in views])


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image, turning PIL's failures into one-line ImageErrors."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS
            try:
                with Image.open(path) as im:
                    im.load()
                    return im.copy()
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"image too large: {path} (over {MAX_IMAGE_PIXELS:,} pixels); downscale it first"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot read image {path}: {e}") from None
