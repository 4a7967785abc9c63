"""Context parallelism (model/context_parallel.py): a packed row cut into shards over 2 and 4
gloo processes gives the loss and the gradients of one process on the whole row (fp32, 1e-5),
with documents and sliding windows that cross shard boundaries; the bytes each layer type
sends are the halo's and the all-gather's, counted."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from trainutil import free_port

WINDOW = 16  # the tiny preset's sliding window: halos of 15 tokens


def _row(t: int, vocab: int, seed: int = 0):
    """One packed row [1, T]: documents of 23, 12, 20 and the rest (boundaries fall inside
    shards and across them), labels on ~2/3 of the tokens, shifted on the whole row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, t), generator=g)
    lengths = [23, 12, 20, t - 55]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = torch.where(torch.rand(1, t, generator=g) < 0.66, ids, -100)
    labels[0, pos[0] == 0] = -100  # a document's first token is no target
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    return ids, pos, labels, targets


def _model(path: str):
    from gemma3_tune.model.checkpoint import load_model

    torch.manual_seed(0)
    return load_model(path, dtype=torch.float32).train()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, size: int, port: int, path: str, out: str) -> None:
    from gemma3_tune.model.context_parallel import ContextGroup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    model = _model(path)
    model.context = ContextGroup.of()
    ids, pos, _, targets = _row(64, model.config.vocab_size)
    n = ids.shape[1] // size
    part = slice(rank * n, (rank + 1) * n)
    count = int((targets != -100).sum())  # the whole row's: every rank knows it
    loss = model(ids[:, part], position_ids=pos[:, part], labels=targets[:, part],
                 num_items_in_batch=count).loss  # fmt: skip
    loss.backward()
    grads = _grads(model)
    for g in grads.values():
        dist.all_reduce(g)
    total = loss.detach().clone()
    dist.all_reduce(total)
    sent = torch.tensor(
        [model.context.sent.get(k, 0) for k in ("sliding_attention", "full_attention")]
    )
    if rank == 0:
        torch.save({"loss": total, "grads": grads, "sent": sent, "n": n}, out)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("size", [2, 4])
def test_shards_equal_one_process(tmp_path, tiny_dir, size):
    model = _model(str(tiny_dir))
    ids, pos, labels, _ = _row(64, model.config.vocab_size)
    want = model(ids, position_ids=pos, labels=labels).loss
    want.backward()
    want_grads = _grads(model)
    out = tmp_path / "cp.pt"
    mp.spawn(_worker, (size, free_port(), str(tiny_dir), str(out)), nprocs=size)
    got = torch.load(out)
    assert abs(got["loss"].item() - want.item()) <= 1e-5
    assert got["grads"].keys() == want_grads.keys()
    for name, g in want_grads.items():
        assert (got["grads"][name] - g).abs().max().item() <= 1e-5, name
    c = model.config
    kv = 2 * c.num_key_value_heads * c.head_dim * 4  # bytes of one token's key and value, fp32
    n = got["n"]
    sliding_layers = sum(t != "full_attention" for t in c.layer_types)
    # rank 0 sends its tail forward in each sliding layer and receives gradients (sends none)
    assert got["sent"][0].item() == sliding_layers * (WINDOW - 1) * kv
    # and its shard to the (size - 1) others in each global layer, forward and backward
    assert got["sent"][1].item() == (c.num_hidden_layers - sliding_layers) * 2 * (size - 1) * n * kv


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
