"""The CUDA paths' defects, checked on the CPU (issue: review of the CUDA paths).

1. A full fine-tune under autocast hands the chunked loss an fp32 master head and bf16 hidden
   states: the head is cast to bf16 once per call (not per chunk and matmul), values and
   gradients are those of the bf16-rounded head, and the head's gradient comes back in fp32.
2. The FlexAttention mask: `create_block_mask` compiled once on CUDA (not `_compile=True` per
   call), and its mask_mods read each token's key once per side while equal to the dense mask.
3. Loss chunks are whole GEMM tiles: rows a multiple of 64 (4B's vocabulary gave 255).
4. The loss finds its scored rows with no host sync in training: the collator computes them on
   the CPU (`scored`) and the model's loss uses them instead of `nonzero`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gemma3_tune.data.collate import Collator
from gemma3_tune.data.template import IGNORE
from gemma3_tune.model import loss as loss_mod
from gemma3_tune.model.config import preset
from gemma3_tune.model.gemma3 import Gemma3
from gemma3_tune.model.init import random_init
from gemma3_tune.model.logprobs import chunked_logprobs
from gemma3_tune.model.loss import (
    SoftTargets,
    chunked_cross_entropy,
    chunked_distillation,
    teacher_targets,
)
from gemma3_tune.model.masks import flex_block_mask, token_info, visible


class _Ops(TorchDispatchMode):
    """Records every aten op that runs, with its tensor arguments' shapes and dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[tuple[tuple[int, ...], torch.dtype]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [*args, *(kwargs or {}).values()]
        tensors = [(tuple(a.shape), a.dtype) for a in flat if isinstance(a, torch.Tensor)]
        self.calls.append((str(func), tensors))
        return func(*args, **(kwargs or {}))

    def count(self, prefix: str) -> int:
        return sum(name.startswith(prefix) for name, _ in self.calls)

    def copies_of(self, *shapes: tuple[int, ...]) -> int:
        """Casts and copies from or to a tensor of one of `shapes` (the [V, D] head, or its
        transpose): their source and destination are their first and last tensor arguments."""
        copies = ("aten._to_copy", "aten.copy_", "aten.clone")
        return sum(
            name.startswith(copies) and any(s in shapes for s, _ in tensors[-1:] + tensors[:1])
            for name, tensors in self.calls
        )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---------------------------------------------------------------------------------------------
# 1. an fp32 master head with bf16 hidden states: one cast per call

V, D = 1000, 48  # no chunk has D rows, so [V, D] and [D, V] are only ever the head


def _problem(seed: int, dtype: torch.dtype = torch.bfloat16, n: int = 260):
    """Hidden states in `dtype` (bf16: with an fp32 head, as under autocast), a head that
    trains, targets with ignored rows: 4 chunks of 64 (with _CHUNK_ELEMENTS = 64 V)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    w_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    w = (torch.randn(V, D, generator=g, dtype=w_dtype) * 0.3).requires_grad_(True)
    t = torch.randint(0, V, (n,), generator=g)
    t[::6] = -100
    t[60:70] = -100  # a run of ignored rows across a chunk edge
    return h, w, t


def _soft(t: torch.Tensor) -> SoftTargets:
    """A teacher's targets for the scored rows (8 draws from a random fp32 teacher: weights of
    n / 8, which sum to 1 exactly, as the loss assumes), alpha 0.6, T 2."""
    g = torch.Generator().manual_seed(9)
    th = torch.randn(int((t != -100).sum()), D, generator=g)
    tw = torch.randn(V, D, generator=g) * 0.5
    targets = teacher_targets(th, tw, 8, "sampled", 2.0, g)
    return SoftTargets(*targets, alpha=0.6, temperature=2.0)


def _ce(h, w, t, soft):
    return chunked_cross_entropy(h, w, t)


def _distill(h, w, t, soft):
    return chunked_distillation(h, w, t, soft)[0]


def _logprobs(h, w, t, soft):
    logp = chunked_logprobs(h, w, t)
    up = torch.linspace(-1.0, 2.0, len(t), dtype=logp.dtype)  # an upstream gradient per row
    return (logp * up).sum()


def _dense(kind: str, h, w, t, soft):
    """The fp32 reference on full logits (h and w already rounded as the chunks see them)."""
    if kind == "ce":
        return F.cross_entropy(h @ w.T, t, ignore_index=-100)
    keep = t != -100
    if kind == "distill":
        logits = h[keep] @ w.T
        q = torch.zeros_like(logits)
        q.index_put_((soft.token, soft.ids), soft.weights.to(q.dtype), accumulate=True)
        kd = -(q * F.log_softmax(logits / 2.0, dim=-1)).sum(-1).mean() * 4.0
        return 0.6 * kd + 0.4 * F.cross_entropy(logits, t[keep])
    logp = torch.log_softmax(h @ w.T, dim=-1).gather(1, t.clamp(min=0)[:, None])[:, 0]
    up = torch.linspace(-1.0, 2.0, len(t), dtype=logp.dtype)
    return (torch.where(keep, logp, torch.zeros_like(logp)) * up).sum()


KINDS = {"ce": _ce, "distill": _distill, "logprobs": _logprobs}


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no_autocast"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_fp32_head_with_bf16_hidden_is_cast_once_per_call(monkeypatch, kind, autocast):
    """Forward and backward through 4 chunks copy the [V, D] head exactly once (autocast on, as
    a full fine-tune runs, or off); the values and both gradients equal the fp32 reference of
    the bf16-rounded head within bf16 tolerance, and the head's gradient is fp32."""
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", 64 * V)
    assert loss_mod._chunk_rows(V) == 64
    h, w, t = _problem(0)
    assert int((t != -100).sum()) > 3 * 64  # at least 4 chunks
    soft = _soft(t)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with ctx, _Ops() as ops:
        got = KINDS[kind](h, w, t, soft)
        gh, gw = torch.autograd.grad(got, (h, w))
    assert ops.copies_of((V, D), (D, V)) == 1, [c for c in ops.calls if "copy" in c[0]]
    assert gw.dtype == torch.float32 and gh.dtype == torch.bfloat16
    h32 = h.detach().float().requires_grad_(True)
    w32 = w.detach().bfloat16().float().requires_grad_(True)  # the rounded head
    want = _dense(kind, h32, w32, t, soft)
    gh_want, gw_want = torch.autograd.grad(want, (h32, w32))
    assert _rel(got, want) <= 2e-2
    assert _rel(gh, gh_want) <= 2e-2
    assert _rel(gw, gw_want) <= 2e-2


def test_teacher_targets_cast_the_head_once():
    """teacher_targets (no gradient) with bf16 hidden states and an fp32 head: one cast for all
    chunks, and the top-k ids those of the bf16-rounded head's logits."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(200, D, generator=g).to(torch.bfloat16)
    w = torch.randn(V, D, generator=g) * 0.3
    with _Ops() as ops:
        ids, weights, token = teacher_targets(h, w, 1, "topk")
    assert ops.copies_of((V, D), (D, V)) == 1
    want = (h.float() @ w.bfloat16().float().T).argmax(-1)
    assert (ids == want).float().mean().item() >= 0.95  # near-ties may round either way
    assert torch.equal(token, torch.arange(200)) and bool((weights == 1).all())


# ---------------------------------------------------------------------------------------------
# 2. FlexAttention masks

IMG = 9


def _packed_rows(images: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 384 tokens (3 tiles of 128): documents of many lengths, padding that is its
    own document, and (with images) image blocks, one of them at a document's start."""
    img = [IMG] * 20 if images else [5] * 20
    docs_a = [[1] * 100, [2, *img, *[3] * 90], [4] * 40, [6] * 10, img + [7] * 30, [0] * 73]
    docs_b = [[8] * 300, [2, *img, 3], [0] * 62]
    ids, pos = [], []
    for docs in (docs_a, docs_b):
        ids.append([x for d in docs for x in d])
        pos.append([p for d in docs for p in range(len(d))])
    assert {len(r) for r in ids} == {384}
    return torch.tensor(ids), torch.tensor(pos)


def _grid(mask_mod, b: int, n: int) -> torch.Tensor:
    q = torch.arange(n)[:, None].expand(n, n)
    k = torch.arange(n)[None, :].expand(n, n)
    bb = torch.full_like(q, b)
    return mask_mod(bb, torch.zeros_like(q), q, k)  # [n, n]


def _tiles(dense: torch.Tensor, size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(any visible, all visible) per tile of a [B, T, T] mask: [B, T/size, T/size] each."""
    b, t, _ = dense.shape
    m = dense.reshape(b, t // size, size, t // size, size)
    return m.any(4).any(2), m.all(4).all(2)


def _block_tiles(bm) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial or full, full) tiles of a BlockMask, as [B, Q blocks, KV blocks] booleans."""
    b, _, q_blocks, n = bm.kv_indices.shape

    def dense(num, idx):
        out = torch.zeros(b, q_blocks, n, dtype=torch.bool)
        for i in range(b):
            for q in range(q_blocks):
                out[i, q, idx[i, 0, q, : num[i, 0, q]]] = True
        return out

    full = dense(bm.full_kv_num_blocks, bm.full_kv_indices)
    return dense(bm.kv_num_blocks, bm.kv_indices) | full, full


@pytest.mark.parametrize("window", [None, 16, 100], ids=["global", "w16", "w100"])
@pytest.mark.parametrize("images", [True, False], ids=["images", "text_only"])
def test_flex_block_mask_equals_dense_mask(window, images):
    """For packed, padded rows: the mask_mod on every (q, kv) pair equals `visible`, and the
    BlockMask's tiles are exactly the dense mask's (partial where some pairs are visible, full
    where all are), with and without images, on sliding and global layers. `images=False` is
    the text-only model's mask_mod (its token_info has no image blocks)."""
    ids, pos = _packed_rows(images)
    info = token_info(ids, pos, IMG if images else None)
    dense = visible(info, info, window)  # [B, T, T]
    bm = flex_block_mask(info, window, images=images)
    for b in range(ids.shape[0]):
        assert torch.equal(_grid(bm.mask_mod, b, ids.shape[1]), dense[b])
    any_tile, all_tile = _tiles(dense)
    got_any, got_full = _block_tiles(bm)
    assert torch.equal(got_any, any_tile)
    assert torch.equal(got_full, all_tile & any_tile)


def test_image_mask_mod_on_a_text_batch_equals_text_mask_mod():
    """A multimodal model on a batch without images keeps the image mask_mod: it agrees with
    the text-only one pair for pair."""
    ids, pos = _packed_rows(images=False)
    info = token_info(ids, pos, IMG)
    for window in (None, 16):
        a, b = (flex_block_mask(info, window, images=x) for x in (True, False))
        for row in range(2):
            assert torch.equal(_grid(a.mask_mod, row, 384), _grid(b.mask_mod, row, 384))


@pytest.mark.parametrize("images,loads", [(False, 2), (True, 4)], ids=["text_only", "images"])
def test_mask_mod_reads_each_token_once_per_side(images, loads):
    """The mask_mod runs for every pair of every partial tile, inside the attention kernels too:
    the text-only one gathers one key per side (document and position packed together), the
    image one adds the block ids: 2 and 4 gathers per call (there were 9)."""
    ids, pos = _packed_rows(images)
    info = token_info(ids, pos, IMG if images else None)
    bm = flex_block_mask(info, 16) if images else flex_block_mask(info, 16, images=False)
    q = torch.arange(384)[:, None].expand(384, 384)
    zero = torch.zeros_like(q)
    with _Ops() as ops:
        bm.mask_mod(zero, zero, q, q.T)
    assert ops.count("aten.index.Tensor") == loads


def test_block_mask_builder_is_compiled_once_and_never_with_the_compile_flag(monkeypatch):
    """On CUDA the builder is one `torch.compile(create_block_mask)` made on first use and
    reused by every call; elsewhere the eager function. `flex_block_mask` never passes torch's
    deprecated `_compile` (which wraps a new compiled function at every call)."""
    import torch.nn.attention.flex_attention as fa

    from gemma3_tune.model import masks

    cuda = torch.device("cuda")  # building the compiled wrapper compiles (and needs) nothing
    first = masks.block_mask_builder(cuda)
    assert first is masks.block_mask_builder(cuda)
    assert first is not fa.create_block_mask and callable(first)
    seen: list[dict] = []
    original = fa.create_block_mask

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(fa, "create_block_mask", recording)
    assert masks.block_mask_builder(torch.device("cpu")) is recording
    ids, pos = _packed_rows(images=True)
    info = token_info(ids, pos, IMG)
    for window in (None, 16):
        flex_block_mask(info, window)
    assert len(seen) == 2 and all("_compile" not in kw for kw in seen), seen


# ---------------------------------------------------------------------------------------------
# 3. chunks of whole GEMM tiles


@pytest.mark.parametrize("vocab", [262144, 262208, 256000, 1000, 7])
def test_chunk_rows_are_a_multiple_of_64_within_the_budget(vocab):
    rows = loss_mod._chunk_rows(vocab)
    assert rows % 64 == 0 and rows >= 64
    assert rows * vocab <= loss_mod._CHUNK_ELEMENTS  # one chunk's fp32 logits: <= 64M
    assert rows + 64 > loss_mod._CHUNK_ELEMENTS // vocab  # the largest such multiple


def test_4b_vocabulary_chunks_are_192_rows():
    assert loss_mod._chunk_rows(262144) == 256
    assert loss_mod._chunk_rows(262208) == 192  # 255 before: every chunk ended in a partial tile


@pytest.mark.parametrize("kind", list(KINDS))
def test_loss_chunks_use_the_rounded_rows(monkeypatch, kind):
    """A budget of 100 rows a chunk gives chunks of 64: every head matmul of the forward takes 64
    rows but the last, and values and gradients equal the full-logit reference (fp64, 1e-10)
    across the chunk edges (a run of ignored rows, soft-target entries split between chunks)."""
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", 100 * V)
    h, w, t = _problem(3, torch.float64, n=330)
    soft = _soft(t)
    with _Ops() as ops:
        got = KINDS[kind](h, w, t, soft)
    shapes = [[shape for shape, _ in args] for name, args in ops.calls if name == "aten.mm.default"]
    rows = [a[0] for a, b in shapes if b[1] == V]  # [c, D] @ [D, V]: the chunks' logits
    k = int((t != -100).sum())
    assert k > 4 * 64 and rows == [64] * (k // 64) + [k % 64], (k, rows)
    want = _dense(kind, h, w, t, soft)
    assert abs(got.item() - want.item()) <= 1e-10 * max(1.0, abs(want.item()))
    grads = torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w))
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max().item() <= 1e-10 * max(1.0, b.abs().max().item())


# ---------------------------------------------------------------------------------------------
# 4. scored rows from the collator: no host sync in the loss


def _rows(images: bool, packed: bool) -> list[dict]:
    """Collator rows: chats with -100 prompts, of different lengths (so padding), packed (a
    row of several documents) or one document a row; with images, blocks of 16 image tokens."""
    g = torch.Generator().manual_seed(5)

    def doc(n_prompt: int, n_reply: int, image: bool) -> tuple[list[int], list[int]]:
        prompt = torch.randint(10, 400, (n_prompt,), generator=g).tolist()
        if image:
            prompt[2:2] = [500] * 16
        reply = torch.randint(10, 400, (n_reply,), generator=g).tolist()
        return prompt + reply, [IGNORE] * len(prompt) + reply

    shapes = [(5, 7, images), (12, 3, False), (3, 20, images), (9, 1, False), (4, 11, False)]
    docs = [doc(*s) for s in shapes]
    groups = [docs[:3], docs[3:]] if packed else [[d] for d in docs]
    rows = []
    for group in groups:
        row = {"input_ids": [], "labels": [], "position_ids": [], "image_refs": []}
        for ids, labels in group:
            row["input_ids"] += ids
            row["labels"] += labels
            row["position_ids"] += list(range(len(ids)))
            row["image_refs"] += [f"img{i}" for i in range(ids.count(500) // 16)]
        rows.append(row)
    return rows


def _collate(images: bool, packed: bool) -> dict:
    def load_image(ref: str) -> torch.Tensor:
        seed = int(ref[3:]) + 1
        return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))

    collate = Collator(pad_id=0, load_image=load_image if images else None, rows_to=6)
    return collate(_rows(images, packed))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("images", [True, False], ids=["images", "text"])
def test_collator_scored_are_the_shifted_targets(images, packed):
    """`scored` lists exactly the rows `_scored` finds: (shifted targets != -100).nonzero()."""
    batch = _collate(images, packed)
    labels = batch["labels"]
    assert (labels == IGNORE).any() and (batch["input_ids"] == 0).any()  # prompts, padding
    assert images == ("pixel_values" in batch)
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]  # as the model shifts them
    want = (targets.reshape(-1) != -100).nonzero()[:, 0]
    assert batch["scored"].dtype == torch.int64
    assert torch.equal(batch["scored"], want)


def _model(images: bool) -> Gemma3:
    cfg = preset("tiny-vision").replace(image_token_id=500) if images else preset("tiny")
    return random_init(Gemma3(cfg), seed=0).train()


def _loss_and_grads(model: Gemma3, batch: dict, **kw) -> tuple[torch.Tensor, list]:
    model.zero_grad()
    loss = model(**batch, **kw).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("extra", ["plain", "num_items", "distill"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("images", [True, False], ids=["images", "text"])
def test_model_loss_and_grads_equal_with_and_without_scored(images, packed, extra):
    """The model's loss and every gradient are the same, bit for bit, whether the loss finds
    its rows itself or takes the collator's `scored` (SFT, HF's num_items_in_batch, and
    distillation, whose soft targets index the same scored rows)."""
    model = _model(images)
    batch = _collate(images, packed)
    kw: dict = {}
    if extra == "num_items":
        kw["num_items_in_batch"] = 3 * int((batch["labels"] != IGNORE).sum())
    if extra == "distill":
        k = batch["scored"].numel()
        ids = torch.randint(0, 512, (3 * k,), generator=torch.Generator().manual_seed(2))
        token = torch.arange(k).repeat_interleave(3)
        kw["soft_targets"] = SoftTargets(ids, torch.full((3 * k,), 1 / 3), token, 0.5, 2.0)
    with_scored = _loss_and_grads(model, batch, **kw)
    without = {k: v for k, v in batch.items() if k != "scored"}
    plain = _loss_and_grads(model, without, **kw)
    assert torch.equal(with_scored[0], plain[0])
    assert len(with_scored[1]) == len(plain[1]) > 0
    for a, b in zip(with_scored[1], plain[1], strict=True):
        assert torch.equal(a, b)


class _HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (each a sync on a GPU)."""

    READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.item", "aten.is_nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.nonzero = self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.nonzero += str(func).startswith("aten.nonzero")
        self.reads += str(func).startswith(self.READS)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_training_step_with_scored_reads_nothing_on_the_host(packed):
    """Forward and backward of the model's loss on a collator batch (text model, training):
    no `nonzero`, and no other host read either. Without `scored` the loss's nonzero is back."""
    model = _model(images=False)
    batch = _collate(images=False, packed=packed)
    with _HostReads() as reads:
        model(**batch).loss.backward()
    assert reads.nonzero == 0 and reads.reads == 0
    with _HostReads() as reads:
        model(**{k: v for k, v in batch.items() if k != "scored"}).loss.backward()
    assert reads.nonzero == 1


def test_chunked_losses_with_scored_call_no_nonzero(monkeypatch):
    """The chunked functions themselves: given `scored`, forward and backward through several
    chunks call no nonzero (distillation keeps its one read of the chunk bounds)."""
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", 64 * 200)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(300, 8, generator=g, requires_grad=True)
    w = torch.randn(200, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 200, (300,), generator=g)
    t[::4] = -100
    scored = (t != -100).nonzero()[:, 0]
    k = scored.numel()
    soft = SoftTargets(t[scored], torch.ones(k), torch.arange(k), 0.5)
    with _HostReads() as reads:
        chunked_cross_entropy(h, w, t, scored).backward()
        chunked_distillation(h, w, t, soft, scored)[0].backward()
    assert reads.nonzero == 0


def test_sequence_logps_ignore_scored():
    """Preference tuning passes the collator's batch too: per-document log-probs (which also
    drop targets across document boundaries) are the same with `scored` in it."""
    model = _model(images=False).eval()
    batch = _collate(images=False, packed=True)
    with torch.no_grad():
        a = model(**batch, sequence_logps=True)
        b = model(**{k: v for k, v in batch.items() if k != "scored"}, sequence_logps=True)
    assert torch.equal(a.logps, b.logps) and torch.equal(a.tokens, b.tokens)
