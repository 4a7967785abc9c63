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
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gemma3_tune.train.distributed import finish

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
    finish()


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
        + f"\n\nMemory: the real 270M, LoRA r=16, fp32, one row of {args.cp_row:,} tokens (forward"
        " and backward; the step's high-water mark over the resident set after loading, glibc's"
        " mmap threshold fixed at 64 KiB):\n\n" + memory(args.cp_row) + "\n"
    )


def _status(key: str) -> float:
    """GiB of a /proc/self/status line (VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 2**20
    raise KeyError(key)


def _memory(rank: int, size: int, row: int, port: int, out: str) -> None:
    """The real 270M with LoRA r=16 on every decoder linear (peft), fp32: one forward and
    backward on this rank's shard of one packed row (documents of 4,096 tokens). Resident
    memory after loading, and the high-water mark of the step."""
    import peft

    from gemma3_tune.convert.embedded import embedded_model_dir
    from gemma3_tune.model.checkpoint import load_model
    from gemma3_tune.model.context_parallel import ContextGroup

    torch.set_num_threads(1 if size > 1 else 2)
    if size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=size)
    model = load_model(embedded_model_dir("gemma3-270m"), dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    if size > 1:
        model.base_model.model.context = ContextGroup.of()
    torch.manual_seed(0)
    ids = torch.randint(3, 200_000, (1, row))
    pos = (torch.arange(row) % 4096)[None]
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]  # shifted on the whole row (every position a target)
    n = row // size
    part = slice(rank * n, (rank + 1) * n)
    loaded = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    t0 = time.perf_counter()
    out_ = model(ids[:, part], position_ids=pos[:, part], labels=labels[:, part],
                 num_items_in_batch=row - 1)  # fmt: skip
    out_.loss.backward()
    seconds = time.perf_counter() - t0
    result = torch.tensor([loaded, _status("VmHWM"), seconds], dtype=torch.float64)
    if size > 1:
        everyone = [torch.empty_like(result) for _ in range(size)]
        dist.all_gather(everyone, result)
    else:
        everyone = [result]
    if rank == 0:
        torch.save(everyone, out)
    finish()  # barrier, then destroy: no rank torn down while another still saves


def memory(row: int) -> str:
    """One process on the whole row against each of 2 context-parallel processes."""
    lines = [
        "| processes | rank | tokens held | RSS after loading | peak in the step | step adds |"
        " time |",
        "|---|---|---|---|---|---|---|",
    ]
    adds = {}
    for size in (1, 2):
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # peaks comparable run to run
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "mem.pt")
            mp.spawn(_memory, (size, row, _free_port(), out), nprocs=size)
            results = torch.load(out)
        for r, (loaded, peak, seconds) in enumerate(x.tolist() for x in results):
            adds[size, r] = peak - loaded
            lines.append(
                f"| {size} | {r} | {row // size:,} | {loaded:.2f} GiB | {peak:.2f} GiB |"
                f" **{peak - loaded:.2f} GiB** | {seconds:.0f} s |"
            )
    worst = max(adds[2, 0], adds[2, 1]) / adds[1, 0]
    return "\n".join(lines) + f"\n\nEach CP rank's step memory: **{worst:.2f}x** one process's."


def rank_bytes(c, tokens: int, n: int) -> float:
    """Computed, not measured: one rank's memory for LoRA on a row of `tokens` over `n`
    context-parallel ranks (ZeRO-3 over the same ranks), bf16, gradient checkpointing on, SDPA
    with dense masks (what context parallelism runs today). Weights / n; each layer's input kept
    (checkpoints); one layer's activations recomputed at a time (10 D + 3 H Dh + 4 K Dh + 4 I
    values a token); a global layer's gathered K and V and their gradients; the dense masks
    (a byte per query-key pair: shard x row for global layers, shard x (shard + W) sliding);
    the loss's fp32 logit chunks (3 x 256 MiB)."""
    d, i, h, k, dh = (
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
    )
    layers = c.num_hidden_layers
    params = c.vocab_size * d + layers * (d * (h + 2 * k) * dh + h * dh * d + 3 * d * i)
    shard = tokens / n
    weights = 2 * params / n
    checkpoints = 2 * shard * layers * d
    one_layer = 2 * shard * (10 * d + 3 * h * dh + 4 * k * dh + 4 * i)
    gathered = 2 * 2 * tokens * 2 * k * dh
    masks = shard * tokens + shard * (shard + c.sliding_window)
    return weights + checkpoints + one_layer + gathered + masks + 3 * 2**28


def capacity(gpu_gib: float = 80.0, usable: float = 0.9) -> str:
    """The longest row (in 1K steps, up to 128K) each model trains per GPU count, computed."""
    from gemma3_tune.model.config import preset

    counts = (1, 2, 4, 8, 16)
    lines = [
        "| model | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    budget = gpu_gib * usable * 2**30
    for name in ("4b", "12b", "27b"):
        c = preset(name)
        cells = []
        for n in counts:
            best = 0
            for k in range(1, 129):
                if rank_bytes(c, k * 1024, n) <= budget:
                    best = k
            cells.append(f"{best}K" if best else "-")
        lines.append(f"| {name.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
