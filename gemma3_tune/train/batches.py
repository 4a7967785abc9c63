"""What the Trainer's DataLoader gets: the prepared rows as a dataset of row numbers (read from
the memory-mapped data when asked for, with what the objective adds to each row), and the
collator, which loads each image as pixels or as cached SigLIP features.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ..data.collate import Collator, bucket_lengths, row_features
from ..data.feature_cache import FeatureCache, weights_fingerprint
from ..data.images import preprocess
from ..data.settings import pan_and_scan_args
from ..data.template import ImageRef
from ..model.gemma3 import bound_recompiles, flex_graph_budget
from ..model.image_blocks import check_image_batch
from .adapters import unwrap
from .distributed import device
from .recipe import Recipe

RowFields = dict[str, Callable[[int], object]]  # name -> row number -> what the row carries


def rows_dataset(rows, fields: RowFields | None = None):
    """Rows for the Trainer as a `datasets.Dataset` (TRL wants one) holding only the row
    numbers; each row's tokens are read from the prepared, memory-mapped data when the
    DataLoader asks for it (`set_transform`), so nothing is copied up front. `fields`: what the
    objective adds to each row (cached teacher targets, a DPO pair's reference log-probs); the
    collator batches them."""
    if not len(rows):
        return None
    import datasets

    fields = fields or {}

    def fetch(batch: dict) -> dict:
        keys = ("input_ids", "labels", "position_ids", "image_refs")
        out: dict[str, list] = {k: [] for k in keys}
        for i in batch["row"]:
            r = row_features(rows[i])
            for k in keys:
                out[k].append(r[k])
        out["row"] = batch["row"]  # which row: the collator passes it on as row_ids
        for name, field in fields.items():
            out[name] = [field(i) for i in batch["row"]]
        return out

    ds = datasets.Dataset.from_dict({"row": list(range(len(rows)))})
    ds.set_transform(fetch)
    return ds


def pixel_loader(recipe: Recipe, cfg):
    """Image ref -> pixels (Pan & Scan as data: says); None for a text-only model. Training's
    images without a feature cache, and a second model's (a teacher, a reference): it runs its
    own tower on the pixels, never on the policy's cached features."""
    if not cfg.is_multimodal:
        return None
    d, size = recipe.data, cfg.vision.image_size
    pas = pan_and_scan_args(d)

    def load_image(im):
        return preprocess(im["path"], size, d.pan_and_scan, **pas)

    return load_image


def _fill_cache(cache: FeatureCache, refs: list) -> None:
    """Under ZeRO-3 the tower's weights are partitioned, and a tower run during training is a
    collective every rank must join: a cache miss in one rank's collator would hang the
    others. So, with the tower gathered once, the cache is filled before training: each rank
    encodes its share of the images, then every rank completes what it cannot see (all of it
    hits on a shared filesystem; a node with its own disk computes the rest)."""
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    for ref in refs[rank::world]:
        cache.features(ref)
    dist.barrier()
    for ref in refs:
        cache.features(ref)


def _missing_feature(pixels: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("feature cache: an image was not encoded before training (ZeRO-3)")


def _feature_loader(recipe: Recipe, model, cfg, data):
    """Image ref -> the trained model's cached SigLIP features (data.feature_cache)."""
    d = recipe.data
    base = unwrap(model)
    tower = list(base.vision_tower.parameters())

    def encode(pixels):
        return base.vision_features(pixels.to(tower[0].device, tower[0].dtype)).float()

    zero3 = hasattr(tower[0], "ds_id")  # DeepSpeed marks the parameters it partitions
    gather = contextlib.nullcontext()
    if zero3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(tower)
    with gather:
        size = cfg.vision.image_size
        fingerprint = weights_fingerprint(base.vision_tower)
        args = (encode, fingerprint, size, d.pan_and_scan, pan_and_scan_args(d))
        cache = FeatureCache(recipe.base_dir / d.feature_cache, *args)
        if zero3:
            _fill_cache(cache, data.image_refs())
            cache.encode = _missing_feature  # every image is cached now
    return lambda im: cache.features(ImageRef(im["path"], im["views"]))


def image_check(cfg):
    """The model's image-block check, run by the collator on the CPU batch: the model skips it
    in GPU training steps, where each would be a host sync."""
    if not cfg.is_multimodal:
        return None
    per_image = cfg.mm_tokens_per_image

    def check(batch: dict) -> None:
        images = batch.get("pixel_values", batch.get("vision_features"))
        n_features = 0 if images is None else images.shape[0] * per_image
        check_image_batch(batch["input_ids"] == cfg.image_token_id, n_features, per_image)

    return check


def training_collator(recipe: Recipe, model, cfg, data, pad_id: int, compiled: bool) -> Collator:
    """The training collator: pixels or cached features per image, and, where compiled code or
    FlexAttention specialise on the batch length, batches padded to a few length buckets
    (eager SDPA does not, so there each batch pads only to its longest row: less compute)."""
    if not cfg.is_multimodal:
        load_image, image_key = None, "pixel_values"
    elif recipe.data.feature_cache:
        load_image, image_key = _feature_loader(recipe, model, cfg, data), "vision_features"
    else:
        load_image, image_key = pixel_loader(recipe, cfg), "pixel_values"
    flex = unwrap(model)._backend(torch.device(device())) == "flex"
    bucket_to, rows_to = None, None
    if compiled or flex:  # a known number of shapes, so of compiled graphs (collate.py)
        bucket_to, rows_to = recipe.data.max_seq_len, recipe.training.micro_batch_size
        lengths = len(bucket_lengths(recipe.data.max_seq_len))
        bound_recompiles(flex_graph_budget(lengths, len(set(cfg.layer_types))))
    return Collator(pad_id, load_image, image_key, bucket_to, rows_to, validate=image_check(cfg))
