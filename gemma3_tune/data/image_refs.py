"""An image a sample names, as a checked ImageRef: a path (relative to data.image_root, else the
data file's folder) or `{"bytes": ..., "path": ...}` as `datasets.Image()` stores one (bytes are
written once to the prepared-data cache, named by their hash); the image must open, and its
views are counted as preprocessing will cut them (Pan & Scan crops)."""

from __future__ import annotations

import os
from pathlib import Path

from .records import SampleError
from .template import ImageRef


def _stored_image(data: bytes, origin: str, store: Path | None) -> Path:
    """Image bytes (a datasets.Image() value) as a file, named by their hash, written once."""
    import hashlib
    import io

    from PIL import Image

    if store is None:
        from .settings import default_cache_dir

        store = default_cache_dir() / "images"
    try:
        with Image.open(io.BytesIO(data)) as im:
            ext = (im.format or "png").lower()
    except Exception as e:  # PIL raises several types for corrupt data
        raise SampleError(origin, f"cannot read image bytes ({e})") from None
    path = store / f"{hashlib.sha256(data).hexdigest()[:32]}.{ext}"
    if not path.is_file():
        store.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)  # atomic: parallel workers may write the same image
    return path


def resolve_image(
    image: object, origin: str, image_root: Path | None, base: Path, store: Path | None = None
) -> Path:
    if isinstance(image, dict) and ("bytes" in image or "path" in image):  # datasets.Image()
        if image.get("bytes"):
            return _stored_image(image["bytes"], origin, store)
        image = image.get("path")
    if not isinstance(image, str) or not image:
        raise SampleError(
            origin,
            "an image must be a file path or {'bytes': ..., 'path': ...} (datasets.Image());"
            f" got {type(image).__name__}",
        )
    if image.startswith(("http://", "https://")):
        raise SampleError(
            origin, f"image URLs are not fetched ({image}); download it and give a path"
        )
    p = Path(image)
    if p.is_absolute():
        return p
    if image_root is None:
        return base / p
    resolved = (image_root / p).resolve()
    if not resolved.is_relative_to(image_root.resolve()):
        raise SampleError(
            origin,
            f"image path {image} leaves data.image_root ({image_root}); give a path inside it"
            " or an absolute path",
        )
    return resolved


def image_ref(path: Path, origin: str, pan_and_scan: bool, pas_args: dict) -> ImageRef:
    """Check the image opens (header only) and count its views as preprocessing will cut
    them: the Pan & Scan crops of the upright image (EXIF orientation applied)."""
    from .images import ImageError, image_views  # torch: only for images

    if not path.is_file():
        raise SampleError(
            origin,
            f"image not found: {path} (relative paths resolve from data.image_root, else the data file's folder)",
        )
    try:
        views = image_views(path, pan_and_scan, **pas_args)
    except ImageError as e:  # too large, corrupt: one line naming the file
        raise SampleError(origin, str(e)) from None
    return ImageRef(str(path), views)
