"""The MFU denominator: each card's dense bf16 peak, found from the name torch prints."""

from __future__ import annotations

import pytest

from gemma3_tune.model.flops import peak_card, peak_flops


@pytest.mark.parametrize(
    "name, card, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", "H100 NVL", 835.5),
        ("NVIDIA H200", "H200 SXM", 989.4),
        ("NVIDIA H200 NVL", "H200 NVL", 835.5),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA A100-PCIE-40GB", "A100", 312.0),
        ("NVIDIA A100 80GB PCIe", "A100", 312.0),
        ("NVIDIA L40S", "L40S", 362.05),
        ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2),
    ],
)
def test_known_cards(name, card, tflops):
    assert peak_card(name) == card
    assert peak_flops(name) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA H100",  # SXM or PCIe: 989 vs 756, so no guess
        "NVIDIA L40",  # not the L40S
        "NVIDIA GeForce RTX 4090 D",  # fewer SMs than the 4090
        "NVIDIA GeForce RTX 4090 Laptop GPU",  # another chip
        "Tesla V100-SXM2-16GB",
        "",
    ],
)
def test_unknown_or_ambiguous_cards_have_no_peak(name):
    assert peak_card(name) is None
    assert peak_flops(name) is None
