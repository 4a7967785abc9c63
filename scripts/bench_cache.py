"""Benchmark section `cache`: image-heavy projector training with the vision-feature cache vs
recomputing SigLIP every step, each in its own process (`python scripts/bench.py _worker cache
...`, dispatched to `cache_worker` here).

    python scripts/bench.py --sections cache --no-append
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
from bench_harness import peak_rss_gib, run_worker, timed_steps


def cache_worker(shape: str, mode: str, steps: int) -> dict:
    """Projector-only training on image-only rows: pixels through the frozen tower every step
    (`recompute`) or features from the cache (`cache`, filled before timing)."""
    from PIL import Image

    from gemma3_tune.data.collate import Collator, concat_row
    from gemma3_tune.data.dataset import vision_tokens
    from gemma3_tune.data.feature_cache import FeatureCache, weights_fingerprint
    from gemma3_tune.data.images import preprocess
    from gemma3_tune.data.template import ImageRef, Turn, render
    from gemma3_tune.data.tokenizer import Tokenizer, train_tiny_tokenizer
    from gemma3_tune.model.config import VisionConfig, preset
    from gemma3_tune.model.gemma3 import Gemma3
    from gemma3_tune.model.init import random_init

    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    ids = train_tiny_tokenizer(tmp, vocab_size=512, seed=0)
    cfg = preset("tiny-vision").replace(
        vocab_size=512,
        image_token_id=ids["<image_soft_token>"],
        boi_token_id=ids["<start_of_image>"],
        eoi_token_id=ids["<end_of_image>"],
    )
    if shape == "4b-siglip-2l":  # the 4B's SigLIP so400m/14 at 896 px, 2 of its 27 layers
        cfg = cfg.replace(vision=VisionConfig(num_hidden_layers=2), mm_tokens_per_image=256)
    model = random_init(Gemma3(cfg), 0)
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    model.train()
    tok = Tokenizer(tmp)
    images = []
    for i in range(4):  # four images per row: an image-heavy caption/VQA batch
        p = tmp / f"img{i}.png"
        Image.new("RGB", (320 + 40 * i, 240), (40 * i, 90, 200 - 30 * i)).save(p)
        images.append(ImageRef(str(p)))
    turns = [
        Turn("user", [*images, "Describe the images."]),
        Turn("assistant", ["Four flat colour fields, blue to red."]),
    ]
    row = concat_row([render(turns, tok, vision_tokens(cfg))])
    row["image_refs"] = [{"path": im.path, "views": im.views} for im in row["image_refs"]]
    size = cfg.vision.image_size
    if mode == "cache":
        cache = FeatureCache(
            tmp / "cache",
            lambda px: model.vision_features(px).float(),
            weights_fingerprint(model.vision_tower),
            size,
        )
        collate = Collator(
            tok.pad_id, lambda im: cache.features(ImageRef(im["path"])), "vision_features"
        )
        collate([row])  # fill the cache: a cost paid once per image for the whole run
    else:
        collate = Collator(tok.pad_id, lambda im: preprocess(im["path"], size), "pixel_values")
    opt = torch.optim.AdamW(model.projector.parameters(), lr=1e-4)

    def step() -> None:
        batch = collate([row])
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = timed_steps(step, steps)
    return {"step_s": statistics.median(times), "peak_gib": peak_rss_gib()}


def section_cache(args) -> str:
    rows = [
        "| vision tower | recompute SigLIP s/step | feature cache s/step | speed-up |",
        "|---|---|---|---|",
    ]
    for shape, label in (
        ("tiny-vision", "tiny-vision (64 px, 2 layers)"),
        ("4b-siglip-2l", "4B SigLIP so400m/14, 896 px, 2 of 27 layers"),
    ):
        slow = run_worker(["cache", shape, "recompute", str(args.steps)])
        fast = run_worker(["cache", shape, "cache", str(args.steps)])
        print(f"cache {shape}: recompute {slow} | cache {fast}", flush=True)
        if "error" in slow or "error" in fast:
            rows.append(f"| {label} | {slow.get('error', '')} | {fast.get('error', '')} | |")
            continue
        rows.append(
            f"| {label} | {slow['step_s']:.3f} | {fast['step_s']:.3f}"
            f" | {slow['step_s'] / fast['step_s']:.1f}x |"
        )
    head = (
        "Projector-only training (`method: none`, `train_projector: true`), one row of four"
        " images and a short caption, tiny decoder, AdamW; the step includes collation (image"
        " decoding + preprocessing, or reading cached features). Not measured here: with all 27"
        " layers the recompute column would grow with the layer count (about 13x) while the"
        " cached one would not change."
    )
    return "\n".join([head, "", *rows])
