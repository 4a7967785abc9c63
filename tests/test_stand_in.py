"""What a rank without images runs so data-parallel ranks stay in step (Gemma3._stand_in),
checked in 2 gloo processes: which vision modules run, and that the logits do not change.

The ranks' agreement is train/'s (distributed.images_needed, which build_model.py gives the
model); here it is given for ZeRO-3 on a plain model, so the decision can be watched without
DeepSpeed (the full ZeRO-3 runs are in test_distributed.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gemma3_tune.model.config import preset
from gemma3_tune.model.gemma3 import Gemma3
from gemma3_tune.train.distributed import finish, images_needed

# (rank 0 has an image, rank 1 has an image, marked as ZeRO-3)
CASES = {
    "zero3, rank 0 only": (True, False, True),
    "zero3, no rank": (False, False, True),
    "ddp, rank 0 only": (True, False, False),
    "ddp, no rank": (False, False, False),
}


def _config():
    # The preset's special ids are the real vocabulary's; give this 512-token model its own.
    return preset("tiny-vision").replace(image_token_id=497, boi_token_id=498, eoi_token_id=499)


def _inputs(config, with_image: bool) -> dict[str, torch.Tensor]:
    n = config.mm_tokens_per_image
    text = torch.arange(3, 3 + 10)
    if not with_image:
        return {"input_ids": text[None]}
    block = torch.tensor(
        [config.boi_token_id] + [config.image_token_id] * n + [config.eoi_token_id]
    )
    gen = torch.Generator().manual_seed(1)
    size = config.vision.image_size
    return {
        "input_ids": torch.cat([text[:4], block, text[4:]])[None],
        "pixel_values": torch.rand(1, 3, size, size, generator=gen),
    }


def _worker(rank: int, store: str, out: str) -> None:
    torch.manual_seed(0)
    model = Gemma3(_config(), attn_backend="sdpa").eval()
    with torch.no_grad():  # before the process group exists: no stand-in is ever run
        alone = {im: model(**_inputs(model.config, im)).logits.tolist() for im in (False, True)}
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    calls = {"tower": 0, "projector": 0}
    model.vision_tower.register_forward_hook(
        lambda *_: calls.__setitem__("tower", calls["tower"] + 1)
    )
    model.projector.register_forward_hook(
        lambda *_: calls.__setitem__("projector", calls["projector"] + 1)
    )
    result = {}
    for name, (img0, img1, zero3) in CASES.items():
        model.images_needed = images_needed(partitioned=zero3)  # as train/build_model.py sets it
        calls.update(tower=0, projector=0)
        batch_has_image = img0 if rank == 0 else img1
        batch = _inputs(model.config, batch_has_image)
        with torch.no_grad():
            logits = model(**batch).logits
        result[name] = {**calls, "logits": logits.tolist(), "alone": alone[batch_has_image]}
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    finish()  # barrier first: a rank torn down early can abort in gloo's destructor


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    d = tmp_path_factory.mktemp("stand_in")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(d / "store"), str(d)), nprocs=2, join=True)
    return [json.loads((d / f"{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize(
    "case, tower, projector",
    [
        ("zero3, rank 0 only", [1, 1], [1, 1]),  # the text rank runs the tower on a stand-in
        ("zero3, no rank", [0, 0], [1, 1]),  # nobody runs the tower
        ("ddp, rank 0 only", [1, 0], [1, 1]),  # the tower's weights are local: skip it
        ("ddp, no rank", [0, 0], [1, 1]),
    ],
)
def test_stand_in_runs_only_what_keeps_ranks_in_step(ranks, case, tower, projector):
    assert [r[case]["tower"] for r in ranks] == tower
    assert [r[case]["projector"] for r in ranks] == projector
    for r in ranks:  # the stand-in is added with weight 0: the logits are bit-identical
        assert r[case]["logits"] == r[case]["alone"]
