"""Our Gemma 3 against transformers' on the same random weights (fp32, max abs diff <= 1e-4)."""

from __future__ import annotations

import pytest
import torch
from reference import hf_model, save_hf

from gemma3_tune.model import load_model, preset

IMG = 500  # image soft-token id in the tiny-vision configs below


def vision_cfg(**kw):
    return preset("tiny-vision").replace(
        image_token_id=IMG, boi_token_id=498, eoi_token_id=499, **kw
    )


TEXT_CASES = {
    "gqa": preset("tiny"),
    "one_kv_head": preset("tiny").replace(num_key_value_heads=1),
    "mha": preset("tiny").replace(num_key_value_heads=4),
    "query_pre_attn_scalar": preset("tiny").replace(query_pre_attn_scalar=24),
    "linear_rope_scaling": preset("tiny").replace(rope_scaling_factor=8.0, rope_theta=5000.0),
    "twelve_layers": preset("tiny").replace(num_hidden_layers=12, layer_types=[]),
}


def _ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 490, (b, t), generator=g)


@pytest.mark.parametrize("name", list(TEXT_CASES))
def test_text_logits_match_transformers(name, tmp_path):
    cfg = TEXT_CASES[name]
    ref = hf_model(cfg)
    ours = load_model(save_hf(ref, tmp_path)).eval()
    ids = _ids(2, 3 * cfg.sliding_window + 5)  # longer than the sliding window
    with torch.no_grad():
        want = ref(ids, use_cache=False).logits
        got = ours(ids).logits
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("layout", ["hf", "published", "memory"])
@pytest.mark.parametrize("dialect", ["v5", "published"])
def test_vision_logits_match_transformers(layout, dialect, tmp_path):
    cfg = vision_cfg()
    ref = hf_model(cfg)
    ours = load_model(save_hf(ref, tmp_path, layout=layout, dialect=dialect)).eval()
    n = cfg.mm_tokens_per_image
    ids = _ids(2, 60)
    ids[0, 4 : 4 + n] = IMG  # two images in one sequence
    ids[0, 30 : 30 + n] = IMG
    ids[1, 40 : 40 + n] = IMG
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        want = ref(
            ids, pixel_values=pixels, token_type_ids=(ids == IMG).long(), use_cache=False
        ).logits
        got = ours(ids, pixel_values=pixels).logits
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dialect", ["v5", "published"])
def test_text_config_dialects(dialect, tmp_path):
    cfg = TEXT_CASES["linear_rope_scaling"]
    ref = hf_model(cfg)
    ours = load_model(save_hf(ref, tmp_path, layout="memory", dialect=dialect)).eval()
    assert ours.config.rope_scaling_factor == 8.0 and ours.config.rope_theta == 5000.0
    ids = _ids(1, 40)
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids, use_cache=False).logits).abs().max().item() <= 1e-4


def test_packed_row_equals_documents_alone(tmp_path):
    """Two documents, each with an image, packed in one row with positions restarting, give
    exactly the logits of each document run alone (transformers gets this wrong today)."""
    cfg = vision_cfg()
    ours = load_model(save_hf(hf_model(cfg), tmp_path)).eval()
    n = cfg.mm_tokens_per_image
    doc_a, doc_b = _ids(1, 45, seed=2)[0], _ids(1, 38, seed=3)[0]
    doc_a[10 : 10 + n] = IMG
    doc_b[3 : 3 + n] = IMG
    pix_a, pix_b = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    row = torch.cat([doc_a, doc_b])[None]
    pos = torch.cat([torch.arange(45), torch.arange(38)])[None]
    with torch.no_grad():
        packed = ours(row, pixel_values=torch.cat([pix_a, pix_b]), position_ids=pos).logits[0]
        alone_a = ours(doc_a[None], pixel_values=pix_a).logits[0]
        alone_b = ours(doc_b[None], pixel_values=pix_b).logits[0]
    assert (packed[:45] - alone_a).abs().max().item() <= 1e-5
    assert (packed[45:] - alone_b).abs().max().item() <= 1e-5


def test_packed_text_row_with_loss_equals_documents_alone(tmp_path):
    cfg = preset("tiny")
    ours = load_model(save_hf(hf_model(cfg), tmp_path)).eval()
    a, b = _ids(1, 30, seed=4), _ids(1, 20, seed=5)
    row, pos = torch.cat([a, b], 1), torch.cat([torch.arange(30), torch.arange(20)])[None]
    labels = row.clone()
    labels[0, 30] = -100  # the first token of document b is not predicted from document a
    with torch.no_grad():
        loss = ours(row, position_ids=pos, labels=labels).loss
        la = ours(a, labels=a).loss
        lb = ours(b, labels=b).loss
    assert abs(loss.item() - (la.item() * 29 + lb.item() * 19) / 48) <= 1e-5


def test_flex_backend_equals_sdpa(tmp_path):
    """FlexAttention (forward on CPU) gives the SDPA logits on a packed row with images."""
    cfg = vision_cfg()
    path = save_hf(hf_model(cfg), tmp_path)
    sdpa = load_model(path, attn_backend="sdpa").eval()
    flex = load_model(path, attn_backend="flex").eval()
    n = cfg.mm_tokens_per_image
    ids = _ids(1, 80)
    ids[0, 5 : 5 + n] = IMG
    ids[0, 50 : 50 + n] = IMG
    pos = torch.cat([torch.arange(40), torch.arange(40)])[None]
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = sdpa(ids, pixel_values=pixels, position_ids=pos).logits
        got = flex(ids, pixel_values=pixels, position_ids=pos).logits
    assert (got - want).abs().max().item() <= 1e-4


def test_wrong_image_token_count_is_a_clear_error(tmp_path):
    cfg = vision_cfg()
    ours = load_model(save_hf(hf_model(cfg), tmp_path)).eval()
    ids = _ids(1, 40)
    ids[0, 2:12] = IMG  # 10 soft tokens, the model needs 16 per image
    with pytest.raises(ValueError, match="exactly 16"):
        ours(ids, pixel_values=torch.randn(1, 3, 64, 64))
