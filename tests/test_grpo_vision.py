"""GRPO with images on the tiny-vision model: each prompt's images go through the SigLIP tower
once per micro-batch (generation and scoring of its G completions reuse the features), the
projector and decoder LoRA train, and the completions are scored like text ones."""

from __future__ import annotations

import json

from trainutil import colour_set, write_recipe


def _prompt_rows(chats, out):
    rows = []
    for line in chats.read_text().splitlines():
        messages = json.loads(line)["messages"]
        rows.append({"prompt": messages[:1], "answer": messages[1]["content"]})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_images_go_through_the_tower_once_per_group(tmp_path, tiny_vision_dir):
    from gemma3_tune.train.adapters import unwrap
    from gemma3_tune.train.recipe import load_recipe
    from gemma3_tune.train.trainer import build_trainer

    chats = colour_set(tmp_path / "img", 6, seed=2)
    data = _prompt_rows(chats, chats.parent / "prompts.jsonl")
    group, steps, prompts_per_step = 4, 2, 2
    path = write_recipe(
        tmp_path / "r.yaml", tiny_vision_dir, data, tmp_path / "run", objective="grpo",
        train_projector=True, data__max_seq_len=400,
        training__max_steps=steps, training__micro_batch_size=prompts_per_step,
        rl__rewards=["contains:answer"], rl__num_generations=group,
        rl__max_completion_length=6,
    )  # fmt: skip
    trainer, out, _ = build_trainer(load_recipe(path))
    seen: list[int] = []
    tower = unwrap(trainer.model).vision_tower
    tower.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    trainer.train()
    assert seen == [prompts_per_step] * steps  # one image per prompt, never G copies
    rows = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == steps * prompts_per_step * group
    answers = {f"{data}:{i + 1}": json.loads(x)["answer"]
               for i, x in enumerate(data.read_text().splitlines())}  # fmt: skip
    for r in rows:
        assert r["rewards"] == [float(answers[r["origin"]] in r["completion"])]
