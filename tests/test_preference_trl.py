"""DPO, IPO and ORPO against TRL 1.16's own trainers on transformers' Gemma 3.

Both sides hold the same weights (a random Gemma3ForCausalLM, loaded into ours) and the same
preference pairs, given as token ids. TRL gets them unpadded-per-pair through its own collators
and computes its loss with its own `compute_loss` / `get_batch_loss_metrics` (its forward, its
reference handling, its formulas); ours packs all pairs into one row and scores them with
`sequence_logps`. Loss, metrics and gradients must agree to 1e-5.
"""

from __future__ import annotations

import peft
import pytest
import torch
from datasets import Dataset
from reference import hf_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from gemma3_tune.model.checkpoint import hf_to_ours
from gemma3_tune.model.config import preset
from gemma3_tune.model.gemma3 import Gemma3
from gemma3_tune.train.objectives.preference_loss import dpo_loss, orpo_loss, pairs

trl = pytest.importorskip("trl")

CFG = preset("tiny")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (prompt, chosen, rejected) lengths: different everywhere, one document longer than the window
SHAPES = [(5, 4, 8), (9, 11, 2), (3, 7, 7)]


def _triples(shapes, seed: int) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(4, 500, (n,), generator=g).tolist()  # noqa: E731
    return [
        {"prompt_ids": draw(p), "chosen_ids": draw(c), "rejected_ids": draw(r)}
        for p, c, r in shapes
    ]


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary: TRL's trainers require one (pad id,
    tokenizing the placeholder dataset); the pairs themselves arrive as ids."""
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(CFG.vocab_size)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="t0", eos_token="t1", bos_token="t2", unk_token="t3"
    )


def _placeholder() -> Dataset:
    return Dataset.from_dict({"prompt": ["t5 t6"], "chosen": [" t7"], "rejected": [" t8"]})


def _common_args(tmp_path) -> dict:
    return dict(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, disable_dropout=True, seed=0,
    )  # fmt: skip


def _ours_from(hf) -> Gemma3:
    ours = Gemma3(CFG, attn_backend="sdpa")
    state = {hf_to_ours(k, False): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours.load_state_dict(state, strict=True)
    return ours.eval()


def _randomise_lora(model, seed: int) -> None:
    """lora_A and lora_B both non-zero: the policy differs from the reference (adapter off)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _packed(triples, pad: int = 5):
    """All pairs in one row: prompt+chosen, prompt+rejected, ..., then padding; labels on the
    reply tokens only, positions restarting at 0 for every document (padding included)."""
    ids, labels, pos = [], [], []
    for t in triples:
        for reply in (t["chosen_ids"], t["rejected_ids"]):
            ids += t["prompt_ids"] + reply
            labels += [-100] * len(t["prompt_ids"]) + reply
            pos += list(range(len(t["prompt_ids"]) + len(reply)))
    ids += [0] * pad
    labels += [-100] * pad
    pos += list(range(pad))
    return torch.tensor([ids]), torch.tensor([labels]), torch.tensor([pos])


def _max_rel_grad_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    scale = max(g.abs().max().item() for g in b.values())
    assert scale > 0
    return max((a[k] - b[k]).abs().max().item() for k in a) / scale


def _trl_dpo(tmp_path, triples, loss_type: str, beta: float, label_smoothing: float, per_call):
    """TRL's DPOTrainer on a peft LoRA model (reference: the adapter disabled, TRL's default for
    peft), its loss on `per_call` pairs at a time, averaged over the calls; gradients likewise.
    Returns (loss, {lora param: grad}, the logged metrics of the last call, the trainer)."""
    hf = hf_model(CFG, seed=3)
    ours = _ours_from(hf)
    args = trl.DPOConfig(
        beta=beta, loss_type=[loss_type], label_smoothing=label_smoothing, **_common_args(tmp_path)
    )
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS)
    trainer = trl.DPOTrainer(
        model=hf, args=args, train_dataset=_placeholder(), processing_class=_tokenizer(),
        peft_config=lora,
    )  # fmt: skip
    policy = trainer.model
    assert trainer.ref_model is None and isinstance(policy, peft.PeftModel)
    _randomise_lora(policy, seed=11)
    calls = [triples[i : i + per_call] for i in range(0, len(triples), per_call)]
    total = 0.0
    for chunk in calls:
        loss = trainer.compute_loss(policy, trainer.data_collator(chunk)) / len(calls)
        loss.backward()
        total += loss.item()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    mode = "train" if policy.training else "eval"
    metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    adapter = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}
    return total, grads, metrics, ours, adapter


def _ours_dpo(ours, adapter, triples, loss_type, beta, label_smoothing):
    """Ours: the same LoRA (TRL's adapter tensors copied by name), every pair in one packed
    row; the reference log-probs with the adapter disabled, passed in."""
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS)
    model = peft.get_peft_model(ours, lora)
    mine = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert mine.keys() == adapter.keys()
    with torch.no_grad():
        for n, p in mine.items():
            p.copy_(adapter[n])
    ids, labels, pos = _packed(triples)
    with torch.no_grad(), model.disable_adapter():
        ref = model(ids, position_ids=pos, labels=labels, sequence_logps=True)
    out = model(ids, position_ids=pos, labels=labels, sequence_logps=True)
    policy, tokens = pairs(out.logps, out.tokens)
    reference, _ = pairs(ref.logps, ref.tokens)
    loss, metrics = dpo_loss(policy, reference, tokens, beta, loss_type, label_smoothing)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, metrics


@pytest.mark.parametrize(
    "ours_loss,trl_loss,beta,eps,per_call",
    [
        ("sigmoid", "sigmoid", 0.1, 0.0, 3),
        # cDPO: TRL 1.16's `sigmoid` ignores label_smoothing; its `aot` line is the cDPO
        # formula, exactly, for one pair per call (the sort it does is then the identity)
        ("sigmoid", "aot", 0.1, 0.2, 1),
        ("ipo", "ipo", 0.1, 0.0, 3),
    ],
    ids=["sigmoid", "sigmoid_label_smoothing", "ipo"],
)
def test_dpo_equals_trl(tmp_path, ours_loss, trl_loss, beta, eps, per_call):
    triples = _triples(SHAPES, seed=1)
    want, want_g, trl_metrics, ours, adapter = _trl_dpo(
        tmp_path, triples, trl_loss, beta, eps, per_call
    )
    got, got_g, metrics = _ours_dpo(ours, adapter, triples, ours_loss, beta, eps)
    assert abs(got - want) <= 1e-5, (got, want)
    assert _max_rel_grad_diff(got_g, want_g) <= 1e-5
    assert abs(want) > 1e-3  # the adapter moved the policy: a loss that is not the trivial one
    if per_call == len(triples):  # TRL logged the whole batch at once
        for key, value in metrics.items():
            assert abs(value.item() - trl_metrics[key]) <= 1e-5 * max(1.0, abs(value.item())), key


def _orpo_features(triples) -> list[dict[str, list[int]]]:
    """What ORPOTrainer.tokenize_row makes of a pair: prompt+reply ids, masks, labels (-100 on
    the prompt)."""
    rows = []
    for t in triples:
        p = t["prompt_ids"]
        row = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
        for side in ("chosen", "rejected"):
            reply = t[f"{side}_ids"]
            row[f"{side}_input_ids"] = p + reply
            row[f"{side}_attention_mask"] = [1] * (len(p) + len(reply))
            row[f"{side}_labels"] = [-100] * len(p) + reply
        rows.append(row)
    return rows


def test_orpo_equals_trl(tmp_path):
    """Full fine-tuning (every weight trains, the tied head too: chunked_logprobs' weight
    gradient). One-token prompts: TRL's NLL runs over the chosen prompt and reply, ours over the
    reply (the batch labels replies only); with one prompt token, which nothing predicts, they
    are the same sum."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    lam = 0.2
    triples = _triples([(1, 6, 12), (1, 19, 4), (1, 9, 9)], seed=2)
    hf = hf_model(CFG, seed=4)
    ours = _ours_from(hf)
    args = ORPOConfig(
        beta=lam, max_length=64, remove_unused_columns=False, **_common_args(tmp_path)
    )
    trainer = ORPOTrainer(
        model=hf, args=args, train_dataset=_placeholder(), processing_class=_tokenizer()
    )
    batch = trainer.data_collator(_orpo_features(triples))
    want, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    want.backward()
    want_g = {hf_to_ours(n, False): p.grad for n, p in trainer.model.named_parameters()}

    ids, labels, pos = _packed(triples)
    out = ours(ids, position_ids=pos, labels=labels, sequence_logps=True)
    policy, tokens = pairs(out.logps, out.tokens)
    got, metrics = orpo_loss(policy, tokens, lam)
    got.backward()
    got_g = {n: p.grad for n, p in ours.named_parameters()}
    assert abs(got.item() - want.item()) <= 1e-5
    assert _max_rel_grad_diff(got_g, want_g) <= 1e-5
    for key, value in metrics.items():
        assert abs(value.item() - trl_metrics[key]) <= 1e-5 * max(1.0, abs(value.item())), key
