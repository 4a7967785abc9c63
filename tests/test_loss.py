"""Chunked cross-entropy against F.cross_entropy on full logits: values, gradients, memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gemma3_tune.model import loss as loss_mod
from gemma3_tune.model.loss import chunked_cross_entropy

VOCAB = 262144  # Gemma 3's real vocabulary


def test_values_and_gradients_match_full_logits():
    torch.manual_seed(0)
    n, d = 600, 32  # 600 tokens span three chunks of the 262144-entry vocabulary
    h = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(VOCAB, d, dtype=torch.float64) * 0.2).requires_grad_(True)
    t = torch.randint(0, VOCAB, (n,))
    t[::7] = -100
    t[256:300] = -100  # a stretch of ignored targets across a chunk edge
    want = F.cross_entropy(h @ w.T, t, ignore_index=-100)
    gh_want, gw_want = torch.autograd.grad(want, (h, w))
    got = chunked_cross_entropy(h, w, t)
    gh, gw = torch.autograd.grad(got, (h, w))
    assert abs(got.item() - want.item()) <= 1e-10
    assert (gh - gh_want).abs().max().item() <= 1e-10
    assert (gw - gw_want).abs().max().item() <= 1e-10


def test_frozen_head_and_scaled_upstream_gradient():
    torch.manual_seed(1)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(1000, 16)  # frozen tied embedding (LoRA)
    t = torch.randint(0, 1000, (50,))
    want = F.cross_entropy(h @ w.T, t) * 3.0
    (gh_want,) = torch.autograd.grad(want, h)
    (gh,) = torch.autograd.grad(chunked_cross_entropy(h, w, t) * 3.0, h)
    assert (gh - gh_want).abs().max().item() <= 1e-5


def test_all_ignored_gives_zero():
    h = torch.randn(4, 8, requires_grad=True)
    loss = chunked_cross_entropy(h, torch.randn(10, 8), torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().sum().item() == 0.0


def test_bf16_within_bf16_tolerance_of_fp32_reference(monkeypatch):
    """bf16 hidden and weight: the matmuls run in bf16 with fp32 accumulation. Loss and both
    gradients stay within 2e-2 (relative to the largest reference value) of plain
    F.cross_entropy on fp32 logits `h.float() @ w.float().T`; bf16 keeps 8 significant bits
    (3.9e-3), so 2e-2 leaves room for the rounding of operands and logits, and still catches
    a dropped scale or a wrong one-hot."""
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", 512 * 16)  # 16 rows a chunk: 6 chunks
    monkeypatch.setattr(loss_mod, "_CHUNK_MULTIPLE", 1)  # rows exactly as set
    torch.manual_seed(2)
    n, d, v = 100, 64, 512  # tiny: bf16 matmuls are ~100x slower than fp32 on this CPU
    h = torch.randn(n, d).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(v, d) * 0.3).to(torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, v, (n,))
    t[::9] = -100
    h32, w32 = h.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    want = F.cross_entropy(h32 @ w32.T, t, ignore_index=-100)
    gh_want, gw_want = torch.autograd.grad(want, (h32, w32))
    got = chunked_cross_entropy(h, w, t)
    gh, gw = torch.autograd.grad(got, (h, w))
    assert got.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b).abs().max() / b.abs().max()).item()

    assert rel(got, want) <= 2e-2
    assert rel(gh, gh_want) <= 2e-2
    assert rel(gw, gw_want) <= 2e-2


@pytest.mark.parametrize("chunk_rows", [16, 48])
def test_chunk_size_does_not_change_results(monkeypatch, chunk_rows):
    """Chunks only bound memory: any chunk size gives the one-chunk loss and gradients."""
    torch.manual_seed(3)
    h = torch.randn(130, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 300, (130,))
    t[40:70] = -100
    whole = chunked_cross_entropy(h, w, t)  # 300-entry vocabulary: one chunk of every row
    g_whole = torch.autograd.grad(whole, (h, w))
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", 300 * chunk_rows)
    monkeypatch.setattr(loss_mod, "_CHUNK_MULTIPLE", 1)  # rows exactly as set
    chunked = chunked_cross_entropy(h, w, t)
    g_chunked = torch.autograd.grad(chunked, (h, w))
    assert abs(chunked.item() - whole.item()) <= 1e-12
    for a, b in zip(g_chunked, g_whole, strict=True):
        assert (a - b).abs().max().item() <= 1e-12


class _HostReads(TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host: on CUDA each one waits for the
    queued kernels (`bool(t)`, `t.item()` and `if t.any():` all end in _local_scalar_dense)."""

    READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.item", "aten.is_nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += str(func).startswith(self.READS)
        return func(*args, **(kwargs or {}))


def test_one_host_read_per_call_not_per_chunk(monkeypatch):
    """Selecting the rows with a target is the only host read (one `nonzero`): forward and
    backward through 6 chunks read nothing else."""
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", 200 * 16)  # 16 rows a chunk
    monkeypatch.setattr(loss_mod, "_CHUNK_MULTIPLE", 1)  # rows exactly as set
    torch.manual_seed(4)
    h = torch.randn(120, 8, requires_grad=True)
    w = torch.randn(200, 8, requires_grad=True)
    t = torch.randint(0, 200, (120,))
    t[::4] = -100  # 90 rows left: 5 chunks of 16 and one of 10
    with _HostReads() as reads:
        loss = chunked_cross_entropy(h, w, t)
        loss.backward()
    assert reads.count == 1
    assert h.grad is not None and w.grad is not None


_MEASURE = r"""
import json, sys, torch, torch.nn.functional as F
from gemma3_tune.model.loss import chunked_cross_entropy
torch.manual_seed(0)
n, d, v = 1024, 64, 262144
h = torch.randn(n, d, requires_grad=True)
w = (torch.randn(v, d) * 0.05).requires_grad_(True)
t = torch.randint(0, v, (n,))
def peak_kb():  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
base = peak_kb()
if sys.argv[1] == "full":
    loss = F.cross_entropy((h @ w.T).float(), t)
else:
    loss = chunked_cross_entropy(h, w, t)
loss.backward()
peak = peak_kb()
print(json.dumps({"loss": loss.item(), "extra_kb": peak - base}))
"""


def _measure(kind: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, kind], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_below_full_logits():
    """1024 tokens x 262144 vocab: full fp32 logits are 1 GiB; the chunked loss must use far less."""
    full, chunked = _measure("full"), _measure("chunked")
    assert abs(full["loss"] - chunked["loss"]) <= 1e-4
    assert chunked["extra_kb"] < 0.5 * full["extra_kb"], (chunked, full)
