"""Masks against the most obvious dense construction: loops over every (query, key) pair."""

from __future__ import annotations

import pytest
import torch

from gemma3_tune.model.masks import token_info, visible

IMG = 9


def obvious_mask(docs: list[list[int]], window: int | None) -> torch.Tensor:
    """docs: token ids per document, packed in order. Written from the definition, pair by pair."""
    ids = [t for d in docs for t in d]
    doc_of, pos_of, image_of = [], [], []
    image = 0
    for di, d in enumerate(docs):
        for p, t in enumerate(d):
            doc_of.append(di)
            pos_of.append(p)
            if t == IMG and not (p > 0 and d[p - 1] == IMG):
                image += 1
            image_of.append(image if t == IMG else None)
    n = len(ids)
    m = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            if doc_of[q] != doc_of[k]:
                continue
            same_image = image_of[q] is not None and image_of[q] == image_of[k]
            ok = k <= q or same_image
            if window is not None and q - k >= window:
                ok = False
            m[q, k] = ok
    return m


CASES = {
    "one_doc_text": [[1, 2, 3, 4, 5, 6, 7, 8]],
    "three_docs": [[1, 2, 3], [4, 5, 6, 7, 8], [1, 2]],
    "image_block": [[1, 2, IMG, IMG, IMG, IMG, 3, 4, 5]],
    "two_images_two_docs": [[1, IMG, IMG, IMG, 2, IMG, IMG, IMG, 3], [4, IMG, IMG, IMG, 5, 6]],
    "image_at_doc_edges": [[1, IMG, IMG], [IMG, IMG, 2, 3]],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("window", [None, 2, 3, 100], ids=["global", "w2", "w3", "w100"])
def test_mask_matches_obvious_construction(case, window):
    docs = CASES[case]
    ids = torch.tensor([[t for d in docs for t in d]])
    pos = torch.tensor([[p for d in docs for p in range(len(d))]])
    info = token_info(ids, pos, IMG)
    got = visible(info, info, window)[0]
    assert torch.equal(got, obvious_mask(docs, window))


def test_text_only_model_ignores_image_ids():
    ids = torch.tensor([[1, IMG, IMG, 2]])
    info = token_info(ids, torch.arange(4)[None], None)
    assert torch.equal(visible(info, info, None)[0], torch.ones(4, 4).tril().bool())


def test_flex_block_mask_matches_dense():
    """The FlexAttention BlockMask evaluates the same predicate pair by pair."""
    from gemma3_tune.model.masks import flex_block_mask

    docs = CASES["two_images_two_docs"]
    ids = torch.tensor([[t for d in docs for t in d]])
    pos = torch.tensor([[p for d in docs for p in range(len(d))]])
    info = token_info(ids, pos, IMG)
    for window in (None, 3):
        bm = flex_block_mask(info, window)
        n = ids.shape[1]
        q = torch.arange(n)[:, None].expand(n, n)
        k = torch.arange(n)[None, :].expand(n, n)
        zero = torch.zeros_like(q)
        dense = bm.mask_mod(zero, zero, q, k)
        assert torch.equal(dense, obvious_mask(docs, window))


@pytest.mark.parametrize("window", [None, 7], ids=["global", "sliding"])
def test_query_chunked_sdpa_equals_one_dense_call(window):
    """Splitting queries and trimming each chunk's key span changes nothing: outputs and
    gradients equal one dense SDPA call (packed documents, an image block, a window)."""
    import torch.nn.functional as F

    from gemma3_tune.model.attention import sdpa_query_chunks

    torch.manual_seed(0)
    docs = [[1] * 30, [2, *[IMG] * 6, *[3] * 20], [4] * 25]
    ids = torch.tensor([[t for d in docs for t in d]] * 2)
    pos = torch.tensor([[p for d in docs for p in range(len(d))]] * 2)
    info = token_info(ids, pos, IMG)
    mask = visible(info, info, window)[:, None]  # [B, 1, T, T]
    t = ids.shape[1]
    q = torch.randn(2, 4, t, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, t, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, t, 8, dtype=torch.float64, requires_grad=True)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    chunked = sdpa_query_chunks(q, k, v, mask, 0.3, chunk=8)
    torch.testing.assert_close(chunked, dense, rtol=0, atol=1e-12)
    grads = [torch.autograd.grad(out.pow(2).sum(), (q, k, v)) for out in (dense, chunked)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_flops_count_the_pairs_the_mask_allows():
    """flops.visible_pairs per layer type equals the True entries of the dense mask of a packed
    row (documents apart, window on sliding layers), and the step total adds up by hand."""
    from gemma3_tune.model.config import GLOBAL, preset
    from gemma3_tune.model.flops import linear_params, train_step_flops, visible_pairs
    from gemma3_tune.model.masks import token_info, visible

    docs = [5, 40, 17, 3]
    pos = torch.cat([torch.arange(n) for n in docs])[None]
    info = token_info(torch.zeros_like(pos), pos, None)
    for window in (None, 16, 4):
        assert int(visible(info, info, window).sum()) == sum(visible_pairs(n, window) for n in docs)
    c = preset("tiny")  # 6 layers: 5 sliding (window 16) + 1 global; D 64, H 4, Dh 16, K 2
    assert linear_params(c) == 6 * (2 * 64 * 16 * 6 + 3 * 64 * 128) + 512 * 64
    t = sum(docs)
    pairs_sliding = int(visible(info, info, 16).sum())
    pairs_global = int(visible(info, info, None).sum())
    attn = 12 * 16 * 4 * (5 * pairs_sliding + pairs_global)
    assert c.layer_types.count(GLOBAL) == 1
    assert (
        train_step_flops(c, docs, adapter_params=1000) == 4 * linear_params(c) * t + 6000 * t + attn
    )
    assert train_step_flops(c, docs, full=True) == 6 * linear_params(c) * t + attn
