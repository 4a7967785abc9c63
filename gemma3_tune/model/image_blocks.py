"""Image blocks: every run of image soft tokens must be whole images, and match the images'
features. Checked in Gemma3.embed, and on the CPU before a training batch moves (train/)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError


class ImageTokenError(UserError, ValueError):
    """Image tokens that do not form whole images."""


def check_image_blocks(is_img: Tensor, per_image: int) -> None:
    """Every run of image tokens must be whole images (`per_image` soft tokens each; our
    template separates images with <end_of_image><start_of_image>, so a run is one image): a
    block cut short, say by truncation, would silently pair positions with the wrong features.
    is_img: [B, T] bool."""
    edges = F.pad(is_img.int(), (1, 1)).diff(dim=1)  # [B, T+1]: +1 at a block start, -1 after
    lengths = (edges == -1).nonzero()[:, 1] - (edges == 1).nonzero()[:, 1]  # row-major pairs
    bad = lengths[lengths % per_image != 0]
    if bad.numel():
        raise ImageTokenError(
            f"an image block has {int(bad[0])} image tokens, but every image needs exactly"
            f" {per_image}; was an image cut by truncation? (data.max_seq_len)"
        )


def check_image_batch(is_img: Tensor, n_features: int, per_image: int) -> None:
    """Image tokens must be whole images and match the soft tokens the images give.
    is_img: [B, T] bool; n_features: images x soft tokens per image (0 without images)."""
    n_slots = int(is_img.sum())
    if n_slots:
        check_image_blocks(is_img, per_image)
    if n_features == n_slots:
        return
    if not n_features:
        raise ValueError(f"input has {n_slots} image tokens but no pixel_values were given")
    raise ValueError(
        f"{n_features // per_image} images give {n_features} soft tokens, but the input has"
        f" {n_slots} image tokens (each image needs exactly {per_image})"
    )
