"""An on-disk cache of frozen SigLIP features, one safetensors file per image.

The tower is frozen, so an image's pooled features never change during training: later
epochs and later runs can skip the tower entirely. The key hashes the image file's bytes, the
preprocessing settings and a fingerprint of the tower's weights, so a different image, a
different Pan & Scan setting or a different checkpoint never hits a stale entry.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..outputs import plain_mode
from .images import PREPROCESS_VERSION, preprocess
from .template import ImageRef


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape and bytes."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureCache:
    """`features(ref) -> [views, mm_tokens, Dv]`, computed once by `encode(pixels)`, then read."""

    def __init__(
        self,
        folder: str | os.PathLike,
        encode: Callable[[torch.Tensor], torch.Tensor],
        fingerprint: str,
        image_size: int,
        pan_and_scan: bool = False,
        pas_args: dict | None = None,
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.encode, self.fingerprint = encode, fingerprint
        self.image_size, self.pan_and_scan, self.pas_args = image_size, pan_and_scan, pas_args or {}
        self.hits = self.misses = 0

    def key(self, ref: ImageRef) -> str:
        h = hashlib.sha256(Path(ref.path).read_bytes())
        h.update(
            f"|{self.image_size}|{self.pan_and_scan}|{sorted(self.pas_args.items())}|{self.fingerprint}|p{PREPROCESS_VERSION}".encode()
        )
        return h.hexdigest()

    def features(self, ref: ImageRef) -> torch.Tensor:
        path = self.folder / f"{self.key(ref)}.safetensors"
        if path.is_file():
            self.hits += 1
            return load_file(str(path))["features"]
        self.misses += 1
        pixels = preprocess(ref.path, self.image_size, self.pan_and_scan, **self.pas_args)
        with torch.no_grad():
            feats = self.encode(pixels).detach().to("cpu").contiguous()
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(fd)
        save_file({"features": feats}, tmp)
        os.chmod(tmp, plain_mode())  # mkstemp and safetensors make 0600 files
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written entry
        return feats
