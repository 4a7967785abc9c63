"""The vision-feature cache gives the tower's own output, and a hit skips the tower."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from gemma3_tune.data.feature_cache import FeatureCache, weights_fingerprint
from gemma3_tune.data.images import preprocess
from gemma3_tune.data.template import ImageRef
from gemma3_tune.model import load_model


def test_cache_equals_tower_and_skips_it(tmp_path, tiny_vision_dir):
    model = load_model(tiny_vision_dir).eval()
    size = model.config.vision.image_size
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 120, 3), dtype=np.uint8)).save(
        tmp_path / "a.png"
    )
    calls = []

    def encode(pixels):
        calls.append(pixels.shape[0])
        return model.vision_features(pixels)

    fp = weights_fingerprint(model.vision_tower)
    cache = FeatureCache(
        tmp_path / "cache", encode, fp, size, pan_and_scan=True, pas_args={"min_crop_size": 16}
    )
    ref = ImageRef(str(tmp_path / "a.png"), views=3)
    first = cache.features(ref)
    second = cache.features(ref)
    assert calls == [3] and (cache.hits, cache.misses) == (1, 1)
    pixels = preprocess(tmp_path / "a.png", size, pan_and_scan=True, min_crop_size=16)
    with torch.no_grad():
        direct = model.vision_features(pixels)
    assert torch.equal(first, direct) and torch.equal(second, direct)

    # The model gives the same logits from cached features as from pixels.
    n = model.config.mm_tokens_per_image
    ids = torch.randint(5, 400, (1, 3 * n + 10))
    ids[0, 2 : 2 + 3 * n] = model.config.image_token_id
    with torch.no_grad():
        a = model(ids, pixel_values=pixels).logits
        b = model(ids, vision_features=second).logits
    assert torch.equal(a, b)

    # Other weights -> other key.
    with torch.no_grad():
        model.vision_tower.post_layernorm.bias.add_(1.0)
    other = FeatureCache(
        tmp_path / "cache",
        encode,
        weights_fingerprint(model.vision_tower),
        size,
        True,
        {"min_crop_size": 16},
    )
    assert other.key(ref) != cache.key(ref)
