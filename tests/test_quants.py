"""model/quants.py against gguf-py's numpy Q4_0/Q5_0/Q8_0: bitwise, scales, codes and bytes."""

from __future__ import annotations

import math
import time

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from gemma3_tune.model.quants import (
    FORMATS,
    bits_per_weight,
    check_width,
    dequantize_blocks,
    fake_quantize,
    pack_blocks,
    quantize_blocks,
    ste,
)

QTYPE = {
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q5_0": gguf.GGMLQuantizationType.Q5_0,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
BLOCK_BYTES = {"q4_0": 18, "q5_0": 22, "q8_0": 34}
HALF = {"q4_0": 8, "q5_0": 16}  # |code range| / 2 of the signed-max formats
F16_MIN_NORMAL = 2.0**-14


def _unpack_gguf(raw: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Scales (float16 [..., nb]) and codes ([..., K]) read back from gguf's bytes, by the block
    structs of ggml-common.h (written here independently of quants.py's packing)."""
    blocks = raw.reshape(*raw.shape[:-1], -1, BLOCK_BYTES[fmt])
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    if fmt == "q8_0":
        codes = blocks[..., 2:].view(np.int8)
    else:
        qs = blocks[..., -16:]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
        if fmt == "q5_0":
            qh = blocks[..., 2:6].copy().view("<u4")  # [..., nb, 1]
            bits = (qh >> np.arange(32, dtype=np.uint32)) & 1
            codes = codes | (bits.astype(np.uint8) << 4)
    return d, codes.reshape(*raw.shape[:-1], -1)


def assert_matches_gguf(w: torch.Tensor, fmt: str) -> None:
    """Scales, codes, packed bytes and fake-quantized values all equal gguf's, bit for bit."""
    raw = quantize(w.float().numpy(), QTYPE[fmt])
    ref = torch.from_numpy(dequantize(raw, QTYPE[fmt]))
    ref_d, ref_q = _unpack_gguf(raw, fmt)

    d, q = quantize_blocks(w, fmt)
    assert d.dtype == torch.float16 and d.shape == (*w.shape[:-1], w.shape[-1] // 32)
    assert q.dtype == (torch.int8 if fmt == "q8_0" else torch.uint8) and q.shape == w.shape
    assert np.array_equal(d.view(torch.int16).numpy(), ref_d.view(np.int16))  # -0.0 included
    assert np.array_equal(q.numpy(), ref_q)
    assert np.array_equal(pack_blocks(d, q, fmt).numpy(), raw)

    assert _same_bits(dequantize_blocks(d, q, fmt), ref)
    assert _same_bits(fake_quantize(w, fmt), ref.to(w.dtype))  # computed in fp32, then cast


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (tells -0.0 from 0.0, unlike torch.equal)."""
    ints = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints), b.view(ints))


def _per_block_scale(shape: tuple[int, int], lo: float, hi: float, g) -> torch.Tensor:
    """One factor 10**u (u uniform in [lo, hi]) per 32-weight block, broadcast to `shape`."""
    rows, k = shape
    u = torch.empty(rows, k // 32, 1).uniform_(lo, hi, generator=g)
    return (10**u).expand(rows, k // 32, 32).reshape(rows, k)


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    zeros = randn(8, 128)
    zeros[:, 32:64] = 0.0
    zeros[3, 96:] = -0.0  # d = -0.0 / -8 = +0.0 here, and 0.0 / -8 = -0.0 above: both signs

    outlier = randn(16, 256) * 0.01  # one weight per block 300-1000x the others
    pos = torch.randint(0, 32, (16, 8, 1), generator=g)
    big = (torch.rand(16, 8, 1, generator=g) * 7 + 3) * torch.sign(randn(16, 8, 1))
    outlier = outlier.view(16, 8, 32).scatter(-1, pos, big).view(16, 256)

    # one ulp either side of the rounding ties (k + 0.5) / 16, in blocks whose first weight
    # makes d = 1/16 exactly: amax 127/16 for Q8_0, m = -8/16 for Q4_0, m = -16/16 for Q5_0
    ties = (torch.randint(-6, 6, (3, 8, 32), generator=g).float() + 0.5) / 16
    direction = torch.where(torch.rand(ties.shape, generator=g) < 0.5, -math.inf, math.inf)
    near = torch.nextafter(ties, direction)
    near[..., 0] = torch.tensor([127.0 / 16, -8.0 / 16, -16.0 / 16]).view(3, 1)
    near = near.view(3, 256)

    return {
        "normal_2d": randn(64, 96),
        "normal_3d": randn(3, 5, 64),
        "normal_1d": randn(96),
        # weights on a coarse grid, as in a model that was quantized once already: x / d then
        # often lands within an ulp of a rounding boundary, where the exact fp32 steps matter
        "grid": torch.randint(-300, 301, (512, 256), generator=g) / 128.0,
        "transposed_view": randn(96, 64).t(),
        "large": randn(16, 256) * 1e4,
        "decades": randn(64, 256) * _per_block_scale((64, 256), -8, 4, g),
        "underflow": randn(16, 256) * 1e-9,  # f16(d) == 0: codes stored, values all zero
        "zero_blocks": zeros,
        "outlier": outlier,
        "near_ties": near,
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_gguf_bitwise(fmt, case):
    assert_matches_gguf(CASES[case], fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_f16_subnormal_scales_match_gguf(fmt):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 256, generator=g) * 1e-5
    d, _ = quantize_blocks(w, fmt)
    subnormal = (d != 0) & (d.float().abs() < F16_MIN_NORMAL)
    assert subnormal.float().mean() > 0.9  # the case is what it claims to be
    assert_matches_gguf(w, fmt)


@pytest.mark.parametrize("fmt", ["q4_0", "q5_0"])
def test_tie_for_largest_magnitude_takes_the_first(fmt):
    """ggml keeps the first value of largest magnitude, with its sign: d = m / -half."""
    half = HALF[fmt]
    w = torch.zeros(2, 32)
    w[0, 3], w[0, 20] = -2.0, 2.0  # negative first: d = -2 / -half > 0
    w[1, 3], w[1, 20] = 2.0, -2.0  # positive first: d < 0
    w[:, 10] = 0.5
    d, q = quantize_blocks(w, fmt)
    assert d[:, 0].tolist() == [2.0 / half, -2.0 / half]
    fq = fake_quantize(w, fmt)
    step = 2.0 / half
    # the first extreme is code 0 (= -half * d); the second would be +half * d, clipped to half-1
    assert fq[0, 3] == -2.0 and fq[0, 20] == 2.0 - step
    assert fq[1, 3] == 2.0 and fq[1, 20] == -(2.0 - step)
    assert q[0, 3] == 0 and q[0, 20] == 2 * half - 1
    assert_matches_gguf(w, fmt)


def test_q8_0_tie_is_symmetric():
    w = torch.zeros(1, 32)
    w[0, 3], w[0, 20] = -2.0, 2.0
    d, q = quantize_blocks(w, "q8_0")
    assert d.item() == np.float16(np.float32(2.0) / np.float32(127))
    assert q[0, 3] == -127 and q[0, 20] == 127
    assert_matches_gguf(w, "q8_0")


def test_q8_0_rounds_half_away_from_zero():
    """roundf, not numpy's half-to-even: with d = 1/16 exactly, x = (k + 0.5) / 16 gives x / d
    = k + 0.5 exactly; 0.49999997 must round to 0 (floor(a + 0.5) would give 1)."""
    ties = [0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 126.5, -126.5]
    below_half = float(np.nextafter(np.float32(0.5), np.float32(0)))  # 0.49999997
    values = [127.0] + ties + [below_half, -below_half]
    w = torch.zeros(1, 32)
    w[0, : len(values)] = torch.tensor(values) / 16
    d, q = quantize_blocks(w, "q8_0")
    assert d.item() == 1 / 16
    want = [math.copysign(math.floor(abs(v) + 0.5), v) for v in values]  # exact in float64
    assert q[0, : len(values)].tolist() == want
    assert want[3] == 3 and np.round(2.5) == 2  # the two rules differ on this block
    assert_matches_gguf(w, "q8_0")


@pytest.mark.parametrize("fmt", ["q4_0", "q5_0"])
def test_signed_formats_round_ties_up_in_units_of_d(fmt):
    """q = trunc(x/d + half + 0.5): a tie x = (k + 0.5) d goes to k + 1, i.e. away from the
    block's extreme m, which sits at code 0."""
    half = HALF[fmt]
    ks = list(range(-half, half - 1))
    first = torch.zeros(32)
    first[0] = -half  # m < 0: d = 1
    first[1 : 1 + len(ks)] = torch.tensor(ks, dtype=torch.float32) + 0.5
    w = torch.stack([first, -first])  # m > 0: d = -1, every value negated
    d, _ = quantize_blocks(w, fmt)
    assert d[:, 0].tolist() == [1.0, -1.0]
    want = torch.zeros(32)
    want[0] = -half
    want[1 : 1 + len(ks)] = torch.tensor(ks, dtype=torch.float32) + 1
    fq = fake_quantize(w, fmt)
    assert torch.equal(fq[0], want) and torch.equal(fq[1], -want)
    assert_matches_gguf(w, fmt)


def test_real_gemma3_270m_weights():
    from safetensors import safe_open

    from gemma3_tune.convert.embedded import embedded_model_dir

    names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.5.self_attn.o_proj.weight",
        "model.layers.11.mlp.down_proj.weight",
    ]
    folder = embedded_model_dir("gemma3-270m")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for name in names:
            w = f.get_tensor(name)
            assert w.dim() == 2 and w.shape[-1] % 32 == 0
            for fmt in FORMATS:
                assert_matches_gguf(w, fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_ste_forward_is_fake_quantize_and_gradient_passes_through(fmt, dtype):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 96, generator=g).to(dtype).requires_grad_()
    out = ste(w, fmt)
    assert out.dtype == dtype and out.requires_grad
    assert _same_bits(out.detach(), fake_quantize(w.detach(), fmt))
    upstream = torch.randn(64, 96, generator=g).to(dtype)
    out.backward(upstream)
    assert _same_bits(w.grad, upstream)


def test_width_not_a_multiple_of_32_is_refused():
    name = "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(ValueError) as e:
        check_width(100, "q4_0", name)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{name}: last dimension 100 is not a multiple of 32")
    assert "Q4_0" in msg and "F16" in msg and "convert_hf_to_gguf.py" in msg
    check_width(640, "q4_0", name)  # fine: returns None
    w = torch.randn(4, 48)
    with pytest.raises(gguf.quants.QuantError):  # gguf refuses the same tensor
        quantize(w.numpy(), QTYPE["q8_0"])
    for fmt in FORMATS:
        with pytest.raises(ValueError, match="last dimension 48 is not a multiple of 32"):
            fake_quantize(w, fmt)


def test_unknown_format_is_refused_and_case_is_ignored():
    w = torch.randn(2, 64)
    with pytest.raises(ValueError, match="q4_1.*known: q4_0, q5_0, q8_0"):
        fake_quantize(w, "q4_1")
    with pytest.raises(ValueError, match="unknown format 'q3_k'"):
        bits_per_weight("q3_k")
    assert torch.equal(fake_quantize(w, "Q8_0"), fake_quantize(w, "q8_0"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_bits_per_weight_is_the_gguf_file_size(fmt):
    w = torch.randn(256, 256).numpy()
    raw = quantize(w, QTYPE[fmt])
    assert raw.nbytes * 8 / w.size == bits_per_weight(fmt)


def test_bits_per_weight_other_types():
    """Hand values, and ggml's own (block weights, block bytes) table as gguf ships it."""
    want = {"f32": 32, "f16": 16, "bf16": 16, "q4_0": 4.5, "q5_0": 5.5, "q8_0": 8.5}
    want |= {"q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}
    for fmt, bits in want.items():
        assert bits_per_weight(fmt) == bits
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[fmt.upper()]]
        assert size * 8 / block == bits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_low_precision_input_is_computed_in_fp32(fmt, dtype):
    w = torch.randn(32, 128).to(dtype)
    fq = fake_quantize(w, fmt)
    assert fq.dtype == dtype
    assert _same_bits(fq, fake_quantize(w.float(), fmt).to(dtype))
    assert_matches_gguf(w, fmt)  # gguf gets the same weights as fp32


@pytest.mark.parametrize("fmt", FORMATS)
def test_vectorised_speed(fmt):
    w = torch.randn(640 * 4, 640)
    fake_quantize(w[:64], fmt)
    start = time.perf_counter()
    fake_quantize(w, fmt)
    assert time.perf_counter() - start < 1.0


def test_one_registry_feeds_the_cli_the_recipe_and_the_writer():
    """model/formats.py's GGUF_TYPES is the one list: the export CLI's choices, the recipe's
    qat.format, the writer's block formats and its general.file_type all come from it, and
    every file type it names exists in the gguf package."""
    import gguf

    from gemma3_tune.cli import build_parser
    from gemma3_tune.export import gguf_export
    from gemma3_tune.model.formats import FLOATS, FORMATS, GGUF_TYPES, K_QUANTS
    from gemma3_tune.train.recipe import QatSection

    export = next(
        a for a in build_parser()._subparsers._group_actions[0].choices["export"]._actions
        if a.dest == "quantize"
    )  # fmt: skip
    assert list(export.choices) == [*FORMATS, *K_QUANTS]
    assert set(GGUF_TYPES) == {*FLOATS, *FORMATS, *K_QUANTS}
    assert (
        QatSection.model_fields["format"].annotation.__args__ == FORMATS == ("q4_0", "q5_0", "q8_0")
    )
    assert gguf_export.BLOCK_FORMATS == FORMATS
    for name, t in GGUF_TYPES.items():
        assert gguf_export.file_type(name) == getattr(gguf.LlamaFileType, t.file_type)
        assert (t.llama_ftype is not None) == (name in K_QUANTS)
