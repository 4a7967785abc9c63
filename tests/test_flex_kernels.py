"""FlexAttention tiles chosen from recorded device properties (no GPU needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention.flex_attention import FlexKernelOptions

from gemma3_tune.model import flex_kernels as fk
from gemma3_tune.model.flex_kernels import (
    USE_SDPA,
    BwdTiles,
    FwdTiles,
    bwd_shared_memory,
    flex_kernel_options,
    fwd_shared_memory,
    options_for_device,
    plan_flex_kernels,
    torch_default_tiles,
)

# torch.cuda.get_device_properties(d) of each card: (major, minor), shared_memory_per_block_optin
CARDS = {
    "NVIDIA H100 80GB HBM3": ((9, 0), 232448),
    "NVIDIA A100-SXM4-80GB": ((8, 0), 166912),
    "NVIDIA L40S": ((8, 9), 101376),
    "NVIDIA GeForce RTX 4090": ((8, 9), 101376),
    "NVIDIA A10": ((8, 6), 101376),
}
BIG = ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"]
SMALL = ["NVIDIA L40S", "NVIDIA GeForce RTX 4090", "NVIDIA A10"]


@pytest.mark.parametrize("card", BIG)
@pytest.mark.parametrize("head_dim", [256, 128])
def test_big_cards_keep_torch_defaults(card, head_dim):
    capability, smem = CARDS[card]
    plan = plan_flex_kernels(head_dim, smem, capability)
    assert flex_kernel_options(head_dim, smem, capability) is None
    assert fwd_shared_memory(plan.default_fwd, head_dim) <= smem
    assert bwd_shared_memory(plan.default_bwd, head_dim) <= smem


@pytest.mark.parametrize("card", SMALL)
def test_100kb_cards_get_tiles_that_fit_at_head_dim_256(card):
    capability, smem = CARDS[card]
    opts = flex_kernel_options(256, smem, capability)
    assert opts == {
        "fwd_BLOCK_M": 32,
        "fwd_BLOCK_N": 64,
        "fwd_num_stages": 2,
        "fwd_num_warps": 4,
        "bwd_BLOCK_M1": 32,
        "bwd_BLOCK_N1": 32,
        "bwd_BLOCK_M2": 32,
        "bwd_BLOCK_N2": 32,
        "bwd_num_stages": 2,
        "bwd_num_warps": 4,
    }
    fwd = FwdTiles(opts["fwd_BLOCK_M"], opts["fwd_BLOCK_N"], 2, 4)
    bwd = BwdTiles(32, 32, 32, 32, opts["bwd_num_stages"], opts["bwd_num_warps"])
    assert fwd_shared_memory(fwd, 256) <= smem
    assert bwd_shared_memory(bwd, 256) <= smem


@pytest.mark.parametrize("card", SMALL)
def test_torch_defaults_at_head_dim_256_do_not_fit_100kb_cards(card):
    """The bug: torch's default tiles on these cards need more than their 101,376 bytes."""
    capability, smem = CARDS[card]
    fwd, bwd = torch_default_tiles(256, capability)
    assert bwd == BwdTiles(64, 64, 64, 64, 2, 4)
    assert bwd_shared_memory(bwd, 256) == 147968 > smem
    assert fwd_shared_memory(fwd, 256) > smem


def test_estimates_agree_with_published_triton_figures():
    """Shared memory Triton reported (or the kernel was seen to compile) on 99 KB boards."""
    budget = 101376
    # Forward, qk head dim 192 (rounded to 256) and v 128, sm_86: "Required: 139776"
    # (pytorch#180278); the three replacements measured there run on an L40.
    assert fwd_shared_memory(FwdTiles(64, 64, 3, 4), 192, v_head_dim=128) == 139776
    for tiles in [FwdTiles(128, 32, 2, 8), FwdTiles(128, 16, 3, 4), FwdTiles(32, 64, 2, 4)]:
        assert fwd_shared_memory(tiles, 192, v_head_dim=128) <= budget
    # Forward at head_dim 256 with torch's sm_12x default compiles on a 99 KB GB10 (#198224).
    assert fwd_shared_memory(FwdTiles(32, 64, 2, 4), 256) <= budget
    # Backward at head_dim 256: torch's sm_8x default "Required: 140800" (unsloth-zoo#542) and
    # its sm_12x default "Required: 114688" (pytorch#198224): the estimate errs high.
    assert bwd_shared_memory(BwdTiles(64, 64, 64, 64, 2, 4), 256) >= 140800
    assert bwd_shared_memory(BwdTiles(64, 64, 64, 64, 1, 4), 256) >= 114688
    # ... and the replacement measured on GB10 (pytorch#198228) fits.
    assert bwd_shared_memory(BwdTiles(32, 32, 32, 32, 2, 4), 256) <= budget


def _installed_torch_defaults(monkeypatch, capability, head_dim, dtype):
    heuristics = pytest.importorskip("torch._inductor.template_heuristics.triton")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    h = heuristics.CUDAConfigHeuristic()
    f = h.get_flex_attn_fwd_configs(head_dim, dtype)[-1]  # the default (no max-autotune)
    b = h.get_flex_attn_bwd_configs(head_dim, dtype)[-1]
    return (
        FwdTiles(f.block_m, f.block_n, f.num_stages, f.num_warps),
        BwdTiles(b.block_m1, b.block_n1, b.block_m2, b.block_n2, b.num_stages, b.num_warps),
    )


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)])
@pytest.mark.parametrize("head_dim", [64, 128, 192, 256, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_default_table_matches_installed_torch(monkeypatch, capability, head_dim, dtype):
    """Our copy of torch's default tiles is what this torch would pick without options."""
    want = _installed_torch_defaults(monkeypatch, capability, head_dim, dtype)
    assert torch_default_tiles(head_dim, capability, dtype.itemsize) == want


def test_candidates_obey_the_kernels_constraints():
    for t in fk._FWD_CANDIDATES:
        assert fk._SPARSE_BLOCK % t.block_m == 0 and fk._SPARSE_BLOCK % t.block_n == 0
    for t in fk._BWD_CANDIDATES:
        assert t.block_n1 % t.block_m1 == 0 and t.block_m2 % t.block_n2 == 0  # tl.static_assert
        assert all(fk._SPARSE_BLOCK % b == 0 for b in (t.block_m1, t.block_n1, t.block_m2))
        assert fk._SPARSE_BLOCK % t.block_n2 == 0
    keys = set(FwdTiles(16, 16, 1, 4).options()) | set(BwdTiles(16, 16, 16, 16, 1, 4).options())
    assert {k.split("_", 1)[1] for k in keys} <= FlexKernelOptions.__optional_keys__


def test_no_tile_fits_means_sdpa():
    plan = plan_flex_kernels(256, 32 * 1024, (7, 5))
    assert plan.options == USE_SDPA
    assert "SDPA" in plan.describe("tiny card")


@pytest.fixture
def fake_cuda(monkeypatch):
    calls = []

    def props(index):
        calls.append(index)
        return SimpleNamespace(
            name="NVIDIA L40S", major=8, minor=9, shared_memory_per_block_optin=101376
        )

    fk._device_plan.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "hip", None)
    yield calls
    fk._device_plan.cache_clear()


def test_options_for_device_reads_properties_once_and_says_why(fake_cuda):
    opts, line = options_for_device(torch.device("cuda"), 256)
    opts["fwd_BLOCK_M"] = 128  # the caller's copy: the cached answer must not change
    again, _ = options_for_device(torch.device("cuda:0"), 256)
    assert again == flex_kernel_options(256, 101376, (8, 9))
    assert fake_cuda == [0]
    assert line.startswith("flex kernels: head_dim 256 on NVIDIA L40S (sm_89, 99 KB")
    assert "BLOCK_M=32 BLOCK_N=64 num_stages=2" in line and "would need 144 KB" in line


def test_options_for_device_off_cuda():
    opts, line = options_for_device(torch.device("cpu"), 256)
    assert opts is None and "torch's defaults" in line
