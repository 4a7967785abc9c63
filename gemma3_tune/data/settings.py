"""The recipe's `data:` section and where its files go: a leaf of data/ the rest imports.

`DataConfig` is the schema (validated by pydantic, unknown keys refused); the helpers below turn
it into paths: the prepared-data cache, the store for images given as bytes, a source's path
relative to the recipe, the keyword arguments `sources.to_turns` takes for a source, and the
Pan & Scan settings as image preprocessing takes them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..paths import cache_root


class Source(BaseModel):
    """One data file or folder. `weight` scales how many of its samples are used (2.0 repeats
    it twice, 0.5 keeps a seeded half); `samples` asks for an exact count (repeating if needed)."""

    model_config = ConfigDict(extra="forbid")
    path: str
    weight: float | None = Field(default=None, gt=0)
    samples: int | None = Field(default=None, gt=0)


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: list[Source] = Field(
        default_factory=list,
        description="training sources: paths or {path, weight | samples} (empty only when"
        " qat.data names the data)",
    )
    eval: list[Source] | None = Field(
        default=None, description="held-out sources (else eval_split)"
    )
    eval_split: float = Field(
        default=0.0, ge=0, lt=1, description="fraction of train held out, seeded"
    )
    image_root: str | None = Field(default=None, description="relative image paths resolve here")
    max_seq_len: int = Field(default=2048, gt=8, description="tokens per row")
    packing: bool = Field(
        default=True, description="pack samples into full rows (best fit decreasing)"
    )
    text_overlap: int = Field(
        default=0, ge=0, description="raw text windows: tokens of context repeated, no loss"
    )
    truncation: Literal["truncate", "drop"] = Field(
        default="truncate",
        description="samples over max_seq_len: cut the end (never inside an image), or drop",
    )
    train_on: Literal["assistant", "last", "all"] = Field(
        default="assistant", description="which tokens get loss"
    )
    pan_and_scan: bool = Field(
        default=False, description="add Pan & Scan crops for wide/tall images"
    )
    pan_and_scan_min_crop_size: int = Field(default=256, description="smallest crop side, pixels")
    pan_and_scan_max_crops: int = Field(default=4, description="most crops per image")
    pan_and_scan_min_ratio: float = Field(
        default=1.2, description="aspect ratio that turns crops on"
    )
    feature_cache: str | None = Field(
        default=None, description="folder caching frozen SigLIP features"
    )
    allow_drop: bool = Field(
        default=False,
        description="train even when over half the samples are too long and dropped",
    )
    max_errors: int = Field(default=20, gt=0, description="bad samples listed before giving up")
    cache_dir: str | None = Field(
        default=None,
        description="prepared (tokenized, packed) data cache; None: ~/.cache/gemma3-tune/data",
    )
    num_proc: int | None = Field(
        default=None, gt=0, description="processes that tokenize; None: every core"
    )

    @model_validator(mode="after")
    def _overlap_leaves_room(self):
        if self.text_overlap >= self.max_seq_len - 1:
            raise ValueError(
                f"data.text_overlap {self.text_overlap} leaves no new tokens in a window of"
                f" max_seq_len {self.max_seq_len} (one is <bos>); use at most"
                f" {self.max_seq_len - 2}"
            )
        return self

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _paths(cls, v):
        if v is None:
            return v
        if isinstance(v, str | dict):
            v = [v]
        return [{"path": s} if isinstance(s, str) else s for s in v]


def image_store(cfg: DataConfig) -> Path:
    """Where images given as bytes (datasets.Image() columns) are written, named by hash."""
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    return root / "images"


def data_root(cfg: DataConfig, base: Path) -> Path:
    """The prepared-data cache root: data.cache_dir (relative to `base`), else the default.
    Teacher targets and teacher answers (distillation) live under it too."""
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    return root if root.is_absolute() else base / root


def default_cache_dir() -> Path:
    """$GEMMA3_TUNE_DATA_CACHE, else the package cache's data/ (~/.cache/gemma3-tune/data);
    data.cache_dir overrides both."""
    env = os.environ.get("GEMMA3_TUNE_DATA_CACHE")
    return Path(env) if env else cache_root() / "data"


def resolve_path(path: str, base: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base / p


def turn_options(cfg: DataConfig, base: Path, path: Path) -> dict:
    """`to_turns` keyword arguments for the records of the source at `path`."""
    return {
        "image_root": resolve_path(cfg.image_root, base) if cfg.image_root else None,
        "pan_and_scan": cfg.pan_and_scan,
        "pas_args": pan_and_scan_args(cfg),
        "base": path if path.is_dir() else path.parent,  # images beside the data
        "image_store": image_store(cfg),
    }


def pan_and_scan_args(cfg: DataConfig) -> dict:
    """data.pan_and_scan_* as `images.preprocess` and `images.image_views` take them."""
    return {
        "min_crop_size": cfg.pan_and_scan_min_crop_size,
        "max_crops": cfg.pan_and_scan_max_crops,
        "min_ratio": cfg.pan_and_scan_min_ratio,
    }
