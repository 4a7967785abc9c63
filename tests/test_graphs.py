"""The shape policy that bounds compiled FlexAttention graphs (issue 22, item 4): batches take
a known set of shapes (length buckets, rows padded to the micro-batch size), the recompile limit
is sized to them, and a shape past it is an error, never torch's silent fall-back to the unfused
path that materialises the whole score matrix. FlexAttention runs forward only on CPU, so the
CPU run covers evaluation and generation; tests/test_gpu.py covers training steps."""

from __future__ import annotations

import random

import pytest
import torch
import torch._dynamo.config as dynamo
from torch._dynamo.utils import counters

from gemma3_tune.data.collate import Collator, bucket_lengths
from gemma3_tune.model import preset
from gemma3_tune.model.gemma3 import Gemma3, bound_recompiles, flex_graph_budget
from gemma3_tune.model.generate import generate
from gemma3_tune.model.init import random_init

MAX_LEN = 256
ROWS = 2


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with no compiled graphs and torch's own limits, and leaves them so."""
    old = dynamo.recompile_limit, dynamo.fail_on_recompile_limit_hit
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    dynamo.recompile_limit, dynamo.fail_on_recompile_limit_hit = old


def _model() -> Gemma3:
    return random_init(Gemma3(preset("tiny"), attn_backend="flex"), seed=0).eval()


def _rows(lengths: list[int]) -> list[dict]:
    rng = random.Random(0)
    return [
        {"input_ids": [rng.randint(4, 400) for _ in range(n)], "labels": [-100] * n,
         "position_ids": list(range(n))}
        for n in lengths
    ]  # fmt: skip


def test_every_bucket_eval_and_generate_stay_within_the_budget():
    """Batches of every length bucket and a short last batch, evaluated: one graph per
    (bucket, layer type), none more for repeats or for the short batch (padded to ROWS);
    generating afterwards (KV cache, SDPA) compiles nothing. All of it under a recompile limit
    of exactly the run's budget, with the limit an error."""
    model = _model()
    cfg = model.config
    buckets = bucket_lengths(MAX_LEN)
    assert buckets == [128, 256]
    layer_types = len(set(cfg.layer_types))
    budget = flex_graph_budget(len(buckets), layer_types)  # training and evaluation
    bound_recompiles(budget)
    collate = Collator(pad_id=0, bucket_to=MAX_LEN, rows_to=ROWS)
    batches = [[60, 100], [200, 130], [90], [70, 120], [250]]  # some short
    with torch.no_grad():
        for lengths in batches:
            batch = collate(_rows(lengths))
            assert batch["input_ids"].shape[0] == ROWS
            model(batch["input_ids"], position_ids=batch["position_ids"])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == len(buckets) * layer_types, graphs  # eval half of the budget
    out = list(generate(model, torch.randint(4, 400, (1, 20)), max_new_tokens=8))
    assert len(out) == 8
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_shape_past_the_budget_is_an_error():
    """torch's own behaviour past its limit (8) is to run FlexAttention unfused, materialising
    the [B, H, T, T] scores: here a budget of one length is exceeded by a second length, and the
    forward raises instead."""
    model = _model()
    budget = flex_graph_budget(1, len(set(model.config.layer_types)), grad_modes=1)
    bound_recompiles(budget)  # the limit becomes an error
    dynamo.recompile_limit = budget  # and is lowered below torch's 8, to reach it at once
    with torch.no_grad():
        model(torch.randint(4, 400, (1, 128)))
        with pytest.raises(Exception, match="recompile_limit|cache_size_limit|recompil"):
            model(torch.randint(4, 400, (1, 256)))


def test_collator_checks_image_blocks_on_the_cpu_batch():
    """GPU training steps skip the model's image-block check (a host sync each); the trainer's
    collator runs it on the CPU batch instead, with the model's message."""
    from gemma3_tune.model.image_blocks import ImageTokenError
    from gemma3_tune.train.batches import image_check

    cfg = preset("tiny-vision").replace(image_token_id=500)
    n = cfg.mm_tokens_per_image
    check = image_check(cfg)
    ids = torch.full((1, 2 * n), 7)
    ids[0, 3 : 3 + n] = 500
    check({"input_ids": ids, "pixel_values": torch.zeros(1, 3, 8, 8)})  # one whole image: fine
    ids[0, 3] = 7  # the block is cut short by one token
    with pytest.raises(ImageTokenError, match=f"every image needs exactly {n}"):
        check({"input_ids": ids, "pixel_values": torch.zeros(1, 3, 8, 8)})
    ids[0, 3] = 500
    with pytest.raises(ValueError, match="no pixel_values"):
        check({"input_ids": ids})
    assert image_check(preset("tiny")) is None
