"""Section gpu's `loss` table: fused linear cross-entropy over Gemma 3's 262k vocabulary on one
CUDA card, ours (chunked) vs Liger's and Apple's cut-cross-entropy kernels, each kernel and
shape in its own process (`python scripts/bench.py _worker loss ...`, dispatched to
`loss_worker` here).

    python scripts/bench.py --sections gpu --cases loss --no-append
"""

from __future__ import annotations

import statistics

import torch
from bench_harness import GIB, run_worker, timed_steps


def _loss_fn(impl: str):
    """fn(hidden [N, D], weight [V, D], labels [N]) -> mean loss, for each implementation."""
    from gemma3_tune.model.loss import chunked_cross_entropy

    if impl == "ours":
        return chunked_cross_entropy
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        return lambda h, w, y: liger(w, h, y)
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy


def loss_worker(impl: str, hidden: int, tokens: int, steps: int) -> dict:
    """Fused linear cross-entropy over Gemma 3's 262k vocabulary, bf16, forward + backward to
    the hidden states (the tied head is frozen under LoRA): ours (chunked, labelled rows only)
    vs Liger's and Apple's cut-cross-entropy kernels, which the [gpu] extra would bring."""
    try:
        fn = _loss_fn(impl)
    except ModuleNotFoundError as e:  # the optional kernels may be absent on an offline card
        if (e.name or "").split(".")[0] not in ("liger_kernel", "cut_cross_entropy"):
            raise
        return {"error": "not installed"}
    dev, vocab = torch.device("cuda"), 262144
    torch.manual_seed(0)
    w = torch.randn(vocab, hidden, device=dev, dtype=torch.bfloat16) * hidden**-0.5
    h = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, vocab, (tokens,), device=dev)
    with torch.no_grad():  # fp32 reference, 1024 rows at a time (full logits would be 32 GiB)
        ref = (
            sum(
                torch.nn.functional.cross_entropy(
                    h[i : i + 1024].float() @ w.float().T, y[i : i + 1024], reduction="sum"
                )
                for i in range(0, tokens, 1024)
            )
            / tokens
        )

    def step() -> None:
        h.grad = None
        fn(h, w, y).backward()

    loss = fn(h, w, y).item()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = timed_steps(step, steps, torch.cuda.synchronize)
    return {
        "ms": 1000 * statistics.median(times),
        "extra_gib": (torch.cuda.max_memory_allocated() - base) / GIB,
        "loss_error": abs(loss - ref.item()),
    }


def gpu_loss_rows(args) -> list[str]:
    rows = [
        "| linear cross-entropy, 262k vocab, bf16, fwd+bwd | ours (chunked) | Liger | cut-cross-entropy |",
        "|---|---|---|---|",
    ]
    for hidden, tokens in ((1152, 8192), (2560, 8192), (2560, 32768)):
        cells = []
        for impl in ("ours", "liger", "cce"):
            timeout = args.budget / 9 if args.budget else None  # 3 shapes x 3 kernels
            r = run_worker(["loss", impl, str(hidden), str(tokens), str(args.steps)], timeout)
            print(f"gpu loss {impl} {hidden} {tokens}: {r}", flush=True)
            cells.append(
                r["error"]
                if "error" in r
                else f"{r['ms']:.1f} ms, +{r['extra_gib']:.2f} GiB, |Δloss| {r['loss_error']:.1e}"
            )
        rows.append(f"| D {hidden}, {tokens} tokens | " + " | ".join(cells) + " |")
    return rows
