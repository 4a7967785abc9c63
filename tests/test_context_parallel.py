"""Context parallelism (model/context_parallel.py): a packed row cut into shards over 2 and 4
gloo processes gives the loss and the gradients of one process on the whole row (fp32, 1e-5),
with documents and sliding windows that cross shard boundaries; the bytes each layer type
sends are the halo's and the all-gather's, counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_distill import make_teacher
from test_preference_train import pair_set
from trainutil import chat_set, colour_set, free_port, losses, write_recipe

from gemma3_tune.train.distributed import finish

WINDOW = 16  # the tiny preset's sliding window: halos of 15 tokens


def _row(t: int, vocab: int, seed: int = 0):
    """One packed row [1, T]: documents of 23, 12, 20 and the rest (boundaries fall inside
    shards and across them), labels on ~2/3 of the tokens, shifted on the whole row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, t), generator=g)
    lengths = [23, 12, 20, t - 55] if t >= 64 else [13, 9, t - 22]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = torch.where(torch.rand(1, t, generator=g) < 0.66, ids, -100)
    labels[0, pos[0] == 0] = -100  # a document's first token is no target
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    return ids, pos, labels, targets


def _vision_batch(c, seed: int = 0) -> dict:
    """A packed row of 80 tokens, documents of 50 and 30, two images of 16 soft tokens: one at
    30-45 (across CP 2's middle, 40: the boundary moves back to 30), one at 60-75."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (1, 80), generator=g)
    ids[0, 30:46] = ids[0, 60:76] = c.image_token_id
    pos = torch.cat([torch.arange(50), torch.arange(30)])[None]
    labels = torch.where(ids == c.image_token_id, -100, ids)
    labels[0, [0, 50]] = -100
    pixels = torch.randn(2, 3, c.vision.image_size, c.vision.image_size, generator=g)
    return {"input_ids": ids, "position_ids": pos, "labels": labels, "pixel_values": pixels}


def _vision_worker(rank: int, size: int, port: int, path: str, out: str) -> None:
    """The trainer's path: shard_batch cuts the row (and picks the shard's images)."""
    from gemma3_tune.model.context_parallel import ContextGroup
    from gemma3_tune.train.context import shard_batch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    model = _model(path)
    model.context = ContextGroup.of()
    batch = _vision_batch(model.config)
    shard = shard_batch(batch, model.context, model.config.image_token_id)
    count = int((batch["labels"][:, 1:] != -100).sum())
    loss = model(**shard, num_items_in_batch=count).loss
    loss.backward()
    # a rank without images has no projector gradient (the trainer's stand-in gives it zeros)
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
             for n, p in model.named_parameters() if p.requires_grad}  # fmt: skip
    for g in grads.values():
        dist.all_reduce(g)
    dist.all_reduce(loss.detach())
    lengths = torch.tensor([shard["input_ids"].shape[1], shard["pixel_values"].shape[0]])
    everyone = [torch.empty_like(lengths) for _ in range(size)]
    dist.all_gather(everyone, lengths)
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": grads, "shards": everyone}, out)
    finish()  # barrier first: a rank torn down early can abort in gloo's destructor


@pytest.mark.slow
def test_vision_shards_keep_images_whole(tmp_path, tiny_vision_dir):
    """CP 2 on tiny-vision: the boundary moves back to the start of the image it would cut
    (shards of 30 and 50 tokens, the second holding both images), and loss and gradients
    (projector included) equal one process's."""
    model = _model(str(tiny_vision_dir))
    batch = _vision_batch(model.config)
    want = model(**batch).loss
    want.backward()
    want_grads = _grads(model)
    assert any("projector" in n for n in want_grads)
    out = tmp_path / "cpv.pt"
    mp.spawn(_vision_worker, (2, free_port(), str(tiny_vision_dir), str(out)), nprocs=2)
    got = torch.load(out)
    assert [x.tolist() for x in got["shards"]] == [[30, 0], [50, 2]]
    assert abs(got["loss"].item() - want.item()) <= 1e-5
    for name, g in want_grads.items():
        assert (got["grads"][name] - g).abs().max().item() <= 1e-5, name


def _model(path: str):
    from gemma3_tune.model.checkpoint import load_model

    torch.manual_seed(0)
    return load_model(path, dtype=torch.float32).train()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank_shard(rank: int, size: int, t: int, port: int, path: str):
    """In a spawned rank: the process group, the model on it, and the row of `_row` with this
    rank's slice of it: (model, ids, pos, targets, part)."""
    from gemma3_tune.model.context_parallel import ContextGroup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    model = _model(path)
    model.context = ContextGroup.of()
    ids, pos, _, targets = _row(t, model.config.vocab_size)
    n = ids.shape[1] // size
    return model, ids, pos, targets, slice(rank * n, (rank + 1) * n)


def _worker(rank: int, size: int, t: int, port: int, path: str, out: str) -> None:
    model, ids, pos, targets, part = _rank_shard(rank, size, t, port, path)
    n = part.stop - part.start
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
    finish()  # barrier first: a rank torn down early can abort in gloo's destructor


@pytest.mark.slow
@pytest.mark.parametrize("size,t", [(2, 64), (4, 64), (4, 40)])
def test_shards_equal_one_process(tmp_path, tiny_dir, size, t):
    """CP 2 and 4 on rows of 64 (halos of 15 from the neighbour), and CP 4 on a row of 40
    (shards of 10: sliding layers all-gather their window instead)."""
    model = _model(str(tiny_dir))
    ids, pos, labels, _ = _row(t, model.config.vocab_size)
    want = model(ids, position_ids=pos, labels=labels).loss
    want.backward()
    want_grads = _grads(model)
    out = tmp_path / "cp.pt"
    mp.spawn(_worker, (size, t, free_port(), str(tiny_dir), str(out)), nprocs=size)
    got = torch.load(out)
    assert abs(got["loss"].item() - want.item()) <= 1e-5
    assert got["grads"].keys() == want_grads.keys()
    for name, g in want_grads.items():
        assert (got["grads"][name] - g).abs().max().item() <= 1e-5, name
    c = model.config
    kv = 2 * c.num_key_value_heads * c.head_dim * 4  # bytes of one token's key and value, fp32
    n = got["n"]
    sliding_layers = sum(t != "full_attention" for t in c.layer_types)
    if n < WINDOW - 1:  # sliding layers gather like global ones
        assert got["sent"][0].item() == sliding_layers * 2 * (size - 1) * n * kv
        return
    # rank 0 sends its tail forward in each sliding layer and receives gradients (sends none)
    assert got["sent"][0].item() == sliding_layers * (WINDOW - 1) * kv
    # and its shard to the (size - 1) others in each global layer, forward and backward
    assert got["sent"][1].item() == (c.num_hidden_layers - sliding_layers) * 2 * (size - 1) * n * kv


def test_boundaries_move_back_before_images_and_refuse_a_shard_of_one_image():
    """Cuts at T i / n move back to the start of an image block they would cut (in any row);
    a block that spans a whole shard cannot be cut: one line, not an empty shard."""
    from gemma3_tune.errors import UserError
    from gemma3_tune.train.context import boundaries

    is_img = torch.zeros(2, 40, dtype=torch.bool)
    is_img[0, 15:25] = True  # cuts 20 (CP 2) and 10, 20, 30 (CP 4)
    is_img[1, 28:33] = True
    assert boundaries(is_img, 2) == [0, 15, 40]
    assert boundaries(is_img, 4) == [0, 10, 15, 28, 40]
    is_img[0, 5:25] = True  # a block from 5 to 25: CP 4's cuts at 10 and 20 both move to 5
    with pytest.raises(UserError, match="an image block spans a whole shard"):
        boundaries(is_img, 4)


def _pair_loss(logps: torch.Tensor) -> torch.Tensor:
    """A loss of the documents' log-probs with a different weight on each (a DPO-like
    nonlinearity), so a wrong scale or a mixed-up document shows in the gradients."""
    w = torch.linspace(-1.0, 1.0, logps.shape[0])
    return torch.nn.functional.logsigmoid(w * logps / 10).sum()


def _logps_worker(rank: int, size: int, t: int, port: int, path: str, out: str) -> None:
    model, ids, pos, targets, part = _rank_shard(rank, size, t, port, path)
    out_ = model(ids[:, part], position_ids=pos[:, part], labels=targets[:, part],
                 sequence_logps=True)  # fmt: skip
    _pair_loss(out_.logps).backward()  # the same loss on every rank, from the summed logps
    grads = _grads(model)
    for g in grads.values():  # data parallelism's average over the group's ranks
        dist.all_reduce(g)
        g /= size
    if rank == 0:
        torch.save({"logps": out_.logps.detach(), "tokens": out_.tokens, "grads": grads}, out)
    finish()


@pytest.mark.slow
@pytest.mark.parametrize("size", [2, 4])
def test_document_logprobs_equal_one_process(tmp_path, tiny_dir, size):
    """Preference tuning's per-document log-probs on shards (documents cut by the shard
    boundaries): the sums, counts and gradients (after the data-parallel average) equal one
    process's on the whole row."""
    model = _model(str(tiny_dir))
    ids, pos, labels, _ = _row(64, model.config.vocab_size)
    want = model(ids, position_ids=pos, labels=labels, sequence_logps=True)
    _pair_loss(want.logps).backward()
    want_grads = _grads(model)
    out = tmp_path / "logps.pt"
    mp.spawn(_logps_worker, (size, 64, free_port(), str(tiny_dir), str(out)), nprocs=size)
    got = torch.load(out)
    assert got["tokens"].tolist() == want.tokens.tolist()
    assert (got["logps"] - want.logps.detach()).abs().max().item() <= 1e-4
    for name, g in want_grads.items():
        assert (got["grads"][name] - g).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize(
    "over,words",
    [
        ({}, "does not divide the 1 processes"),
        ({"training__micro_batch_size": 2}, "one packed row per micro-batch"),
        ({"training__compile": True}, "training.compile: true"),
        ({"model__attn_backend": "flex"}, "model.attn_backend: flex"),
        ({"objective": "grpo"}, "runs objectives sft"),
        ({"qat": {"format": "q4_0", "distribution": "sampled"}}, "sampled in each step"),
    ],
)
def test_refusals_are_one_line(tmp_path, tiny_dir, capsys, monkeypatch, over, words):
    from gemma3_tune.cli import main

    if "does not divide" not in words:
        monkeypatch.setenv("WORLD_SIZE", "2")  # checked before any process group exists
    data = chat_set(tmp_path / "chat.jsonl", n=8)
    over = {
        "training__context_parallel": 2, "data__max_seq_len": 64,
        "training__micro_batch_size": 1, **over,
    }  # fmt: skip
    r = write_recipe(tmp_path / "r.yaml", tiny_dir, data, tmp_path / "out", **over)
    assert main(["train", str(r)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_data_check_says_the_plan_and_refuses_short_rows(tmp_path, tiny_dir, capsys):
    """`data check`: the shards, the halo and the bytes per layer type; rows too short for a
    halo per shard, one line."""
    from gemma3_tune.cli import main

    data = chat_set(tmp_path / "chat.jsonl", n=8)
    r = write_recipe(
        tmp_path / "r.yaml", tiny_dir, data, tmp_path / "out", data__max_seq_len=64,
        training__micro_batch_size=1,
    )  # fmt: skip
    assert main(["data", "check", str(r), "training.context_parallel=2"]) == 0
    out = capsys.readouterr().out
    c = _model(str(tiny_dir)).config
    kv = 2 * c.num_key_value_heads * c.head_dim * 4  # fp32
    sliding = 2 * 5 * (WINDOW - 1) * kv / 2**20  # 5 sliding layers, halo and its gradient
    assert "context parallel: 2 shards of 32 tokens per row; halo 15 tokens" in out
    assert f"sliding layers send {sliding:,.2f} MiB" in out
    assert main(["data", "check", str(r), "training.context_parallel=8"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shorter than a sliding layer's halo (15)" in err[0], err


def _torchrun(procs: int, recipe, *overrides: str) -> str:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
        "--master_port", str(free_port()), "-m", "gemma3_tune", "train", str(recipe), *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _logged(run, key: str) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def _eval_losses(run) -> list[float]:
    return _logged(run, "eval_loss")


def _weights(run) -> dict[str, torch.Tensor]:
    if (run / "adapter").is_dir():
        return load_file(str(run / "adapter" / "adapter_model.safetensors"))
    return load_file(str(run / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir):
    """One process per method on rows of 64 tokens packed from short chats (several documents
    a row), 3 steps of 2 rows (micro-batch 1 x grad_accum 2), an evaluation at the end. Also
    distillation from a perturbed copy (its sampled targets cached, then sharded), QAT's
    self-teacher on every position (the full distribution, in the step, on the shards), and
    DPO and ORPO on packed pairs (each document's log-prob summed over the shards)."""
    from gemma3_tune.cli import main

    d = tmp_path_factory.mktemp("cp")
    data = chat_set(d / "chat.jsonl", n=40)
    teacher = make_teacher(tiny_dir, d / "teacher", seed=1)
    prefs = pair_set(d / "pairs.jsonl", n=40)
    kinds = {
        "lora": {}, "full": {"method": "full"}, "qlora": {"method": "qlora"},
        "distill": {"distill": {"teacher": str(teacher), "samples": 16}},
        "qat": {"qat": {"format": "q4_0", "distribution": "full"}},
        "dpo": {"objective": "dpo"}, "orpo": {"objective": "orpo"},
    }  # fmt: skip
    recipes = {}
    for kind, over in kinds.items():
        rows = prefs if "objective" in over else data
        r = write_recipe(
            d / f"{kind}.yaml", tiny_dir, rows, d / f"single-{kind}",
            data__max_seq_len=64, data__eval_split=0.1, training__max_steps=3,
            training__micro_batch_size=1, training__grad_accum=2, training__save_steps=3,
            training__lr=1e-3, data__cache_dir=str(d / "cache"), **over,
        )  # fmt: skip
        assert main(["train", str(r)]) == 0
        recipes[kind] = r
    return d, recipes


def _same_run(want, got) -> None:
    a, b = losses(want), losses(got)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
    for key in ("kd_loss", "ce_loss"):  # distillation's logs: the group's shares added up
        ka, kb = _logged(want, key), _logged(got, key)
        assert len(ka) == len(kb)
        for x, y in zip(ka, kb, strict=True):
            assert abs(x - y) <= 1e-5 * abs(x), (key, ka, kb)
    ea, eb = _eval_losses(want), _eval_losses(got)
    assert len(ea) == len(eb) >= 1
    assert abs(ea[-1] - eb[-1]) <= 1e-5 * abs(ea[-1]), (ea, eb)
    # Adam moves each entry by about lr whatever its gradient's size: an entry whose gradient
    # is ~1e-9 (rounding) moves by a sign. The weights compare at a tenth of one step (lr 1e-3);
    # the losses above (steps 2 and 3 run on the updated weights) and the final evaluation at 1e-5.
    wa, wb = _weights(want), _weights(got)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= 1e-4, k


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,procs,extra",
    [
        ("lora", 2, ()),  # CP 2
        ("full", 2, ()),
        ("qlora", 2, ()),  # NF4 base weights (bitsandbytes on the CPU)
        ("distill", 2, ()),  # cached sampled targets, sharded
        ("qat", 2, ()),  # Q4_0 fake quantization; the self-teacher's full softmax on shards
        ("dpo", 2, ()),  # the reference's log-probs cached on whole rows
        ("orpo", 2, ()),
        ("lora", 4, ()),  # CP 4: shards of 16 tokens, halos of 15
        ("lora", 4, ("deepspeed=zero2",)),  # DP 2 x CP 2
        ("lora", 4, ("deepspeed=zero3",)),
    ],
)
def test_training_equals_one_process(runs, method, procs, extra):  # method: a `runs` kind
    """Losses of 3 steps and the final evaluation equal one process's (1e-5), and so do the
    trained weights (see _same_run): the data-parallel side halves grad_accum to keep the
    global batch."""
    d, recipes = runs
    cp = 2 if extra else procs
    dp = procs // cp
    out = d / f"cp{cp}-dp{dp}-{method}-{'-'.join(extra) or 'ddp'}"
    log = _torchrun(
        procs, recipes[method], f"training.context_parallel={cp}", f"training.output_dir={out}",
        f"training.grad_accum={2 // dp}", *extra,
    )  # fmt: skip
    assert f"context parallel: {cp} shards of {64 // cp} tokens per row; halo 15 tokens" in log
    if method in ("distill", "qat"):
        assert len(_logged(out, "kd_loss")) == 3
    _same_run(d / f"single-{method}", out)


@pytest.mark.slow
def test_vision_training_equals_one_process(tmp_path, tiny_vision_dir):
    """Tiny-vision, LoRA and the projector, rows of 64 tokens packed from picture chats (16
    soft tokens each) and text chats: CP 2 (a cut inside an image block moves back to its
    start) equals one process over 3 steps, evaluation and weights included."""
    from gemma3_tune.cli import main

    data = colour_set(tmp_path / "img", 16, seed=1, with_text_only=8)
    r = write_recipe(
        tmp_path / "v.yaml", tiny_vision_dir, data, tmp_path / "single", train_projector=True,
        data__max_seq_len=64, data__eval_split=0.1, training__max_steps=3,
        training__micro_batch_size=1, training__grad_accum=2, training__save_steps=3,
        training__lr=1e-3,
    )  # fmt: skip
    assert main(["train", str(r)]) == 0
    out = tmp_path / "cp2"
    _torchrun(2, r, "training.context_parallel=2", f"training.output_dir={out}")
    _same_run(tmp_path / "single", out)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
