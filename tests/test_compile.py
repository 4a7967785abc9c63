"""Regional compilation (each decoder / SigLIP layer compiled in place) against eager, and
length buckets that keep a whole training run on a few compiled shapes."""

from __future__ import annotations

import copy
import json
import math
import random

import peft
import pytest
import torch
from torch._dynamo.utils import counters

from gemma3_tune.data.collate import bucket_length
from gemma3_tune.model import preset
from gemma3_tune.model.gemma3 import Gemma3
from gemma3_tune.model.init import random_init
from gemma3_tune.train.adapters import target_regex

IMG = 500


def _lora_model(cfg) -> torch.nn.Module:
    model = random_init(Gemma3(cfg, attn_backend="sdpa"), seed=3)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_regex("all-linear")
    )
    model = peft.get_peft_model(model, lora)
    with torch.no_grad():  # lora_B starts at zero: make it random so both A and B get gradients
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def _loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def _packed_batch(vision: bool) -> dict:
    """Two rows of 600 tokens (over 2 x 256, so the query-chunked SDPA path runs too), each
    three packed documents; with vision, three images among them."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 490, (2, 600), generator=g)
    pos = torch.cat([torch.arange(250), torch.arange(200), torch.arange(150)])[None].repeat(2, 1)
    batch = {"input_ids": ids, "position_ids": pos, "labels": ids.clone()}
    if vision:
        n = preset("tiny-vision").mm_tokens_per_image
        ids[0, 10 : 10 + n] = IMG
        ids[0, 300 : 300 + n] = IMG
        ids[1, 460 : 460 + n] = IMG
        batch["labels"] = ids.masked_fill(ids == IMG, -100)
        batch["pixel_values"] = torch.randn(3, 3, 64, 64, generator=g)
    return batch


@pytest.mark.parametrize("name", ["tiny", "tiny-vision"])
def test_compiled_layers_equal_eager(name):
    """Loss and every LoRA gradient of the compiled model equal eager's (fp32, 1e-5), with and
    without gradient checkpointing around the compiled layers (recomputed in backward)."""
    cfg = preset(name)
    if cfg.is_multimodal:
        cfg = cfg.replace(image_token_id=IMG, boi_token_id=498, eoi_token_id=499)
    eager = _lora_model(cfg)
    compiled = copy.deepcopy(eager)
    compiled.get_base_model().compile_layers()
    batch = _packed_batch(cfg.is_multimodal)
    want_loss, want = _loss_and_grads(eager, batch)
    for checkpointed in (False, True):
        if checkpointed:
            compiled.get_base_model().gradient_checkpointing_enable()
        got_loss, got = _loss_and_grads(compiled, batch)
        assert abs(got_loss - want_loss) <= 1e-5 * max(1.0, abs(want_loss)), checkpointed
        assert want.keys() == got.keys() and len(want) == 2 * 7 * cfg.num_hidden_layers
        for n in want:
            scale = want[n].abs().max().item()
            assert (got[n] - want[n]).abs().max().item() <= 1e-5 * max(1.0, scale), (
                n,
                checkpointed,
            )
    # names are unchanged: checkpoints and adapters of a compiled model load anywhere
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_bucket_length():
    assert [bucket_length(n, 2048) for n in (1, 128, 129, 300, 1025, 2048)] == [
        128,
        128,
        256,
        512,
        2048,
        2048,
    ]
    assert bucket_length(1500, 1536) == 1536  # capped at max_seq_len, not the next power of two
    assert bucket_length(100, 64) == 100  # never shorter than the row


def _variable_chats(path, n: int, seed: int = 0):
    """Chats whose replies run from a few to several hundred tokens (the tiny tokenizer spends
    about one token per character of these words)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            k = rng.randint(0, 9)
            reply = " ".join(str(rng.randint(0, 9)) for _ in range(int(rng.paretovariate(1.2) * 4)))
            msgs = [
                {"role": "user", "content": f"count {k}"},
                {"role": "assistant", "content": reply[:900]},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


@pytest.mark.slow
def test_training_run_compiles_once_per_bucket(tmp_path, tiny_dir):
    """200 steps over variable-length, unpacked data with compile on: at most
    ceil(log2(max_seq_len / 128)) + 1 batch lengths, and no new graph once each has been seen."""
    from trainutil import write_recipe
    from transformers import TrainerCallback

    from gemma3_tune.train.recipe import load_recipe
    from gemma3_tune.train.trainer import build_trainer

    max_len = 1024
    data = _variable_chats(tmp_path / "chats.jsonl", 400)
    recipe_path = write_recipe(
        tmp_path / "r.yaml",
        tiny_dir,
        data,
        tmp_path / "run",
        data__max_seq_len=max_len,
        data__packing=False,
        training__max_steps=200,
        training__micro_batch_size=2,
        training__save_steps=1000,
        training__compile=True,
    )
    trainer, _, _ = build_trainer(load_recipe(recipe_path))
    lengths: list[int] = []
    collate = trainer.data_collator

    def recording_collator(rows):
        batch = collate(rows)
        lengths.append(batch["input_ids"].shape[1])
        return batch

    trainer.data_collator = recording_collator
    graphs: list[int] = []  # unique compiled graphs after each step

    class Graphs(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            graphs.append(counters["stats"]["unique_graphs"])

    trainer.add_callback(Graphs())
    counters.clear()
    trainer.train()

    assert len(graphs) == 200 and len(lengths) >= 200
    seen = sorted(set(lengths))
    assert len(seen) <= math.ceil(math.log2(max_len / 128)) + 1, seen
    assert len(seen) >= 3, seen  # the data really does vary in length
    assert all(n in (128, 256, 512, 1024) for n in seen), seen
    first_pass = max(lengths.index(n) for n in seen)  # step at which the last new length came
    assert graphs[first_pass] > 0
    assert graphs[-1] == graphs[first_pass], (first_pass, graphs[first_pass], graphs[-1])
