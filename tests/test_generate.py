"""KV-cache decoding equals decoding without a cache, past the sliding window too."""

from __future__ import annotations

import torch
from reference import hf_model, save_hf

from gemma3_tune.model import load_model, preset
from gemma3_tune.model.generate import generate, kv_cache_bytes

IMG = 500


def _greedy(model, ids, n, **kw):
    return list(generate(model, ids, max_new_tokens=n, **kw))


def test_cached_greedy_equals_uncached_past_window(tmp_path):
    cfg = preset("tiny")  # window 16
    model = load_model(save_hf(hf_model(cfg, seed=3), tmp_path)).eval()
    prompt = torch.randint(4, 490, (1, 9))
    cached = _greedy(model, prompt, 40)
    plain = _greedy(model, prompt, 40, use_cache=False)
    assert len(cached) == 40 and cached == plain
    assert len(set(cached)) > 3  # a real sequence, not one repeated token


def test_cached_greedy_with_long_prompt_and_image(tmp_path):
    cfg = preset("tiny-vision").replace(image_token_id=IMG, boi_token_id=498, eoi_token_id=499)
    model = load_model(save_hf(hf_model(cfg, seed=4), tmp_path)).eval()
    prompt = torch.randint(4, 490, (1, 30))  # longer than the window (16)
    prompt[0, 5 : 5 + cfg.mm_tokens_per_image] = IMG
    pixels = torch.randn(1, 3, 64, 64)
    cached = _greedy(model, prompt, 30, pixel_values=pixels)
    plain = _greedy(model, prompt, 30, pixel_values=pixels, use_cache=False)
    assert cached == plain


def test_sliding_layers_keep_only_their_window(tmp_path):
    cfg = preset("tiny")
    model = load_model(save_hf(hf_model(cfg), tmp_path)).eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(4, 490, (1, 50)), cache=cache)
        model(torch.randint(4, 490, (1, 1)), cache=cache)
    for t, k in zip(cfg.layer_types, cache.keys, strict=True):
        assert k.shape[2] == (51 if t == "full_attention" else cfg.sliding_window - 1)


def test_kv_cache_size_formula_against_hand_count():
    cfg = preset("27b")  # 62 layers: 10 global, 52 sliding (window 1024), 16 KV heads x 128
    per_token = 2 * 16 * 128 * 2  # K and V, bf16
    want = (10 * 32768 + 52 * 1024) * per_token
    assert kv_cache_bytes(cfg, 32768) == want
    assert kv_cache_bytes(cfg, 32768, all_global=True) == 62 * 32768 * per_token


def test_batched_greedy_equals_one_at_a_time(tmp_path):
    from gemma3_tune.model.generate import generate_batch

    cfg = preset("tiny")
    model = load_model(save_hf(hf_model(cfg, seed=5), tmp_path)).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 490, (n,), generator=g).tolist() for n in (3, 11, 25, 7)]
    batched = generate_batch(model, prompts, max_new_tokens=30, pad_id=0)
    for p, got in zip(prompts, batched, strict=True):
        assert got == _greedy(model, torch.tensor([p]), 30)


def test_groups_share_each_prompts_cache(tmp_path):
    """generate_groups runs each prompt once and repeats its KV cache for its samples: greedy,
    every sample of a prompt equals the prompt decoded alone (past the window, so the sliding
    layers' trimmed caches are repeated too); a completion ends with the stop token it drew."""
    from gemma3_tune.model.generate import generate_groups

    cfg = preset("tiny")  # window 16
    model = load_model(save_hf(hf_model(cfg, seed=5), tmp_path)).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 490, (n,), generator=g).tolist() for n in (3, 20)]
    alone = [_greedy(model, torch.tensor([p]), 24) for p in prompts]
    stop = alone[0][5]
    out, cut = generate_groups(
        model, prompts, 3, [None] * 6, max_new_tokens=24, stop_ids={stop}, temperature=0.0
    )
    for b in range(len(prompts)):
        want = alone[b][: alone[b].index(stop) + 1] if stop in alone[b] else alone[b]
        for k in range(3):
            assert out[b * 3 + k] == want
            assert cut[b * 3 + k] == (stop not in alone[b])
    assert cut[0] is False and len(out[0]) == alone[0].index(stop) + 1 <= 6
    # under ZeRO-3 a rank decodes on while another rank's completions run (`stop` says when
    # all are done): the tokens past a completion's stop are drawn and dropped
    asked: list[bool] = []
    longer = generate_groups(
        model, prompts[:1], 3, [None] * 3, max_new_tokens=24, stop_ids={stop}, temperature=0.0,
        stop=lambda mine: asked.append(mine) or False,
    )  # fmt: skip
    assert longer == (out[:3], cut[:3])
    assert len(asked) == 24 and asked[-1] is True


def test_sample_rows_draws_from_the_distribution():
    """Inverse-CDF sampling per row: frequencies over 20,000 draws match softmax(logits / T)
    within 4 standard errors; top_k and top_p never draw an excluded id; a row's draws depend
    on its own generator only."""
    from gemma3_tune.model.generate import _probs, sample_rows

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, 1.5]])
    n = 20_000
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    draws = sample_rows(logits.expand(n, -1), gens, 0.8, 1.0, 0)
    freq = torch.bincount(draws, minlength=6).double() / n
    p = torch.softmax(logits[0].double() / 0.8, -1)
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-9).all(), (freq, p)
    top = sample_rows(logits.expand(n, -1), gens[:n], 1.0, 1.0, 2)
    assert set(top.tolist()) == {0, 5}
    nucleus = _probs(logits, 1.0, 0.5, 0)
    allowed = set(nucleus[0].nonzero()[:, 0].tolist())
    more = [torch.Generator().manual_seed(i) for i in range(2000)]
    assert set(sample_rows(logits.expand(2000, -1), more, 1.0, 0.5, 0).tolist()) <= allowed
    a = sample_rows(logits.repeat(2, 1), [torch.Generator().manual_seed(7)] * 2, 1.0, 1.0, 0)
    b = sample_rows(logits, [torch.Generator().manual_seed(7)], 1.0, 1.0, 0)
    assert a[0] == b[0]
