"""Chunked cross-entropy against F.cross_entropy on full logits: values, gradients, memory."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import torch.nn.functional as F

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


def test_peak_memory_below_full_logits():
    """1024 tokens x 262144 vocab: full fp32 logits are 1 GiB; the chunked loss must use far less."""
    full, chunked = _measure("full"), _measure("chunked")
    assert abs(full["loss"] - chunked["loss"]) <= 1e-4
    assert chunked["extra_kb"] < 0.5 * full["extra_kb"], (chunked, full)
