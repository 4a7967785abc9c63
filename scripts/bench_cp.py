"""Benchmark section `cp`: what context parallelism sends per training step, per layer type.

Measured: the real Gemma 3 270M's layout (a random model of its config, no download) on one
packed row over 2 and 4 gloo processes, counting the bytes each rank hands to torch.distributed
(model/context_parallel.py's `ContextGroup.sent`), beside the formula (`traffic`) for the same
row. Computed: the formula for 4B, 12B and 27B at 32K and 128K tokens over 8 ranks, ours against
ring attention and Ulysses.

    python scripts/bench.py --sections cp --no-append
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SLIDING, GLOBAL = "sliding_attention", "full_attention"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def _measure(rank: int, size: int, row: int, port: int, out: str) -> None:
    """One forward and backward of a LoRA-free 270M-shaped model on this rank's shard."""
    from gemma3_tune.model.config import preset
    from gemma3_tune.model.context_parallel import ContextGroup
    from gemma3_tune.model.gemma3 import Gemma3

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    torch.manual_seed(0)
    # one 5 : 1 block: every count scales with the number of layers of each type
    c = preset("270m").replace(num_hidden_layers=6, layer_types=[])
    model = Gemma3(c)
    model.context = ContextGroup.of()
    n = row // size
    ids = torch.randint(3, 1000, (1, n))
    pos = torch.arange(rank * n, (rank + 1) * n)[None]
    labels = ids.clone()
    model(ids, position_ids=pos, labels=labels, num_items_in_batch=row).loss.backward()
    sent = torch.tensor([model.context.sent.get(t, 0) for t in (SLIDING, GLOBAL)])
    everyone = [torch.empty_like(sent) for _ in range(size)]
    dist.all_gather(everyone, sent)
    if rank == 0:
        torch.save(everyone, out)
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measured(row: int = 2048) -> str:
    from gemma3_tune.model.config import preset
    from gemma3_tune.model.context_parallel import traffic

    c = preset("270m").replace(num_hidden_layers=6, layer_types=[])
    lines = [
        "| ranks | rank | sliding layers sent (measured) | formula, middle rank | global layers"
        " sent (measured) | formula |",
        "|---|---|---|---|---|---|",
    ]
    for size in (2, 4):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "sent.pt")
            mp.spawn(_measure, (size, row, _free_port(), out), nprocs=size)
            sent = torch.load(out)
        t = traffic(c, row, size, dtype_bytes=4)["ours"]
        for r, s in enumerate(sent):
            lines.append(
                f"| {size} | {r} | {int(s[0]):,} B | {t[SLIDING]:,} B | {int(s[1]):,} B"
                f" | {t[GLOBAL]:,} B |"
            )
    return "\n".join(lines)


def computed(ranks: int = 8) -> str:
    from gemma3_tune.model.config import preset
    from gemma3_tune.model.context_parallel import traffic

    lines = [
        "| model | tokens | ranks | sliding: ours | ring | Ulysses | ours / ring | global: ours"
        " | ring | Ulysses |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("4b", "12b", "27b"):
        c = preset(name)
        for row in (32 * 1024, 128 * 1024):
            t = traffic(c, row, ranks, dtype_bytes=2)
            o, r, u = t["ours"], t["ring"], t["ulysses"]
            lines.append(
                f"| {name.upper()} | {row // 1024}K | {ranks} |"
                f" {_mib(o[SLIDING])} | {_mib(r[SLIDING])} | {_mib(u[SLIDING])} |"
                f" {o[SLIDING] / r[SLIDING]:.2%} | {_mib(o[GLOBAL])} | {_mib(r[GLOBAL])} |"
                f" {_mib(u[GLOBAL])} |"
            )
    return "\n".join(lines)


def section_cp(args) -> str:
    return (
        "Bytes one rank sends per training step (forward and backward), one row, by layer type."
        " Ours: sliding layers send the halo (W - 1 tokens of K and V) forward and its gradient"
        " back; global layers all-gather K and V and reduce-scatter their gradients, counted as"
        " (N - 1) shards each (what a ring sends). Ring attention: K and V round the ring in"
        " forward, again with their gradients in backward, on every layer. Ulysses: all-to-alls"
        " of Q, K, V in and the output back, forward and backward, on every layer.\n\n"
        "Measured on gloo, fp32, a 270M-shaped model cut to one 5 : 1 block (6 layers), a row of"
        " 2,048 tokens (the first rank receives the halo and sends no halo gradient; the last"
        " sends no halo; the formula is a middle rank's):\n\n"
        + measured()
        + "\n\nComputed (bf16 K and V, MiB per rank per step, all layers of the type):\n\n"
        + computed()
        + "\n"
    )
