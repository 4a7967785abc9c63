"""Score targets on held-out chats: greedy replies through our batched KV-cache decoder (or the
training loss), each target's scores per metric (eval/report.py prints them as a table with a
row per target, with the samples where targets disagree); or on held-out preference pairs
(`--metric preference`, how a DPO/ORPO run is measured).

Each sample's last assistant turn is the reference and the turns before it the prompt, both
rendered exactly as training renders them (`data.template.render`). Models are loaded one at a
time; replies are decoded in batches of text-only prompts (ragged, left-padded) and one at a
time for prompts with images.

A preference pair is rendered as training renders it (`data.preference.render_pair`: one sample
of two documents, prompt + chosen then prompt + rejected, labels on the replies only). Up to
`batch_size` pairs (and PAIR_TOKENS tokens) are packed into one row per forward, positions
restarting at each document, and the model returns each document's summed reply log-prob
(`sequence_logps=True`): a pair scores 1.0 when chosen > rejected, strictly.

Prompt-only rows (`--metric reward`) are answered and scored by eval/rewarded.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.documents import document_kind
from ..data.preference import is_pair, pair_turns
from ..data.sources import Record, SampleError, read_records, to_turns
from ..data.template import (
    ImageRef,
    Turn,
    VisionTokens,
    generation_prompt,
    has_images,
    reference_text,
    stop_at_call,
)
from ..errors import UserError
from . import llama_cpp
from .loss import WINDOW, documents, token_loss
from .metrics import GENERATION, OURS_ONLY, PREFERENCE, REWARD, SCORERS
from .model_inputs import pixels, vision_of
from .targets import Target, eval_dtype, load_target, target_config


@dataclass
class EvalSample:
    origin: str  # "file:line"
    turns: list[Turn]  # the whole conversation (the loss metric scores all of it)
    reference: str  # the last assistant turn's text (its calls, up to the first tool result)
    document: Record | None = None  # raw text or prompt-completion: scored by `loss` only
    base: Path | None = None  # a document's folder (images of a conversational one)
    window: int = WINDOW  # raw text: scored in windows of this many tokens (eval/loss.py)

    @property
    def prompt_turns(self) -> list[Turn]:
        return self.turns[:-1]

    @property
    def has_images(self) -> bool:
        return has_images(self.turns)

    def prompt_text(self) -> str:
        if self.document is not None:
            data = self.document.data
            return str(data.get("prompt", data.get("text", "")))
        return _text(self.prompt_turns[-1])

    def describe(self) -> dict:
        """The sample's line in predictions.jsonl (before the targets' results)."""
        return {"origin": self.origin, "prompt": self.prompt_text(), "reference": self.reference}


@dataclass
class EvalPair:
    """A held-out preference pair. It is rendered per target (the tokenizer and the image
    tokens are the target's) by training's own `render_pair`; the texts are for reports."""

    origin: str  # "file:line"
    record: Record
    base: Path  # the data file's folder: image paths are relative to it, as in training
    prompt: str  # the prompt's last user turn
    chosen: str
    rejected: str
    has_images: bool

    def describe(self) -> dict:
        keys = ("origin", "prompt", "chosen", "rejected")
        return {k: getattr(self, k) for k in keys}


@dataclass
class TargetResult:
    label: str
    replies: list[str | None] = field(default_factory=list)  # None: not generated (loss only)
    scores: dict[str, float] = field(default_factory=dict)  # metric -> mean score
    per_sample: dict[str, list[float]] = field(default_factory=dict)
    perplexity: float | None = None
    margin: float | None = None  # preference: mean chosen - rejected log-prob (nats)
    logps: list[tuple[float, float]] = field(default_factory=list)  # preference: per pair
    completions: list[list[dict]] = field(default_factory=list)  # reward: per prompt, each one


def _text(turn: Turn) -> str:
    return " ".join(p if isinstance(p, str) else "<image>" for p in turn.parts)


def _data_base(path: Path) -> Path:
    return path if path.is_dir() else path.parent  # images beside the data, as in training


def _read(path: str | Path, limit: int | None, one, what: str) -> list:
    """`one(record, base)` for the records of a data file (any format training reads), at most
    `limit`; a bad record is one line naming its file:line."""
    out: list = []
    path = Path(path)
    base = _data_base(path)
    try:
        for record in read_records(path):
            out.append(one(record, base))
            if limit is not None and len(out) >= limit:
                break
    except SampleError as e:
        raise UserError(f"eval --data: {e}") from None
    if not out:
        raise UserError(f"eval --data {path}: no {what}")
    return out


def _chat(record: Record, base: Path, window: int = WINDOW) -> EvalSample:
    if is_pair(record.data):  # to_turns' own advice is for training (objective: dpo)
        raise SampleError(
            record.origin,
            "a preference pair (prompt/chosen/rejected), not a chat; score pairs with"
            " --metric preference",
        )
    if document_kind(record.data) is not None:
        return EvalSample(record.origin, [], "", record, base, window)
    turns = to_turns(record, base=base)
    if turns[-1].role != "assistant":
        raise SampleError(
            record.origin,
            "the last turn must be the assistant's (it is the reference to score against)",
        )
    return EvalSample(record.origin, turns, reference_text(turns[-1]))


def load_samples(path: str | Path, limit: int | None, window: int = WINDOW) -> list[EvalSample]:
    """The chats of a data file, each ending in an assistant turn, and its raw text and
    prompt-completion rows (for `loss`; raw text scored in windows of `window` tokens)."""
    return _read(path, limit, lambda rec, base: _chat(rec, base, window), "samples")


def load_pairs(path: str | Path, limit: int | None) -> list[EvalPair]:
    """The preference pairs of a data file (TRL's preference format), each checked as training
    checks it, so a bad row is refused before any model loads."""
    return _read(path, limit, _pair, "pairs")


def _pair(record: Record, base: Path) -> EvalPair:
    """Validate one row the way `render_pair` will (its prompt, then each document's turns)."""
    origin, data = record.origin, record.data
    if isinstance(data, SampleError):
        raise data
    if not is_pair(data):
        keys = data if isinstance(data, dict) else {}
        kind = next((k for k in ("messages", "conversations", "instruction") if k in keys), None)
        what = f"a chat ('{kind}')" if kind else "a row with no 'chosen'/'rejected'"
        raise SampleError(
            origin,
            f"{what}, not a preference pair: --metric preference scores TRL's"
            " {prompt, chosen, rejected} rows; score chats with --metric exact, json, contains"
            " or loss",
        )
    context, *docs = pair_turns(record, {"base": base})  # as render_pair will see them
    replies = [_text(turns[-1]) for turns in docs]
    return EvalPair(
        origin, record, base, _text(context[-1]), *replies, has_images=has_images(context)
    )


def prompt_ids(
    tok, sample: EvalSample, vision: VisionTokens | None
) -> tuple[list[int], list[ImageRef]]:
    """The prompt as training renders it, ending in `<start_of_turn>model\\n`."""
    return generation_prompt(sample.prompt_turns, tok, vision)


def reply_budget(tok, samples: list[EvalSample], max_new_tokens: int | None) -> int:
    """`max_new_tokens`, or when not given twice the longest reference reply in tokens (at
    least 32): a base model never ends its turn, and each of its replies ran to 128 tokens
    (30 samples x 2 targets took 5m48) where the task needs a tenth of that."""
    if max_new_tokens is not None:
        return max_new_tokens
    return max(32, 2 * max((len(tok.encode(s.reference)) for s in samples), default=0))


def replies(model, tok, samples: list[EvalSample], max_new_tokens: int | None, batch: int, bar):
    """Greedy replies (text), stopping at `<end_of_turn>`, EOS or a call's end, or after
    `reply_budget` tokens."""
    from ..model.generate import generate, generate_batch

    max_new_tokens = reply_budget(tok, samples, max_new_tokens)

    stops = tok.stop_ids()
    out: list[str | None] = [None] * len(samples)
    rendered = [prompt_ids(tok, s, vision_of(model)) for s in samples]
    text_only = [i for i, (_, images) in enumerate(rendered) if not images]
    with torch.no_grad():
        for a in range(0, len(text_only), batch):
            chunk = text_only[a : a + batch]
            got = generate_batch(
                model,
                [rendered[i][0] for i in chunk],
                max_new_tokens=max_new_tokens,
                stop_ids=stops,
                pad_id=tok.pad_id,
            )
            for i, ids in zip(chunk, got, strict=True):
                out[i] = stop_at_call(tok.decode(ids))
            bar.update(len(chunk))
        device = next(model.parameters()).device
        for i, (ids, images) in enumerate(rendered):
            if images:
                new = generate(
                    model,
                    torch.tensor([ids], device=device),
                    max_new_tokens=max_new_tokens,
                    pixel_values=pixels(model, images),
                    stop_ids=stops,
                )
                out[i] = stop_at_call(tok.decode(list(new)))
                bar.update(1)
    return out


PAIR_TOKENS = 4096  # tokens per forward when scoring pairs (a longer pair gets a row alone)


def pair_groups(lengths: list[int], batch: int, budget: int = PAIR_TOKENS) -> list[list[int]]:
    """Consecutive pairs, up to `batch` of them and `budget` tokens per group (one forward)."""
    groups: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if groups and len(groups[-1]) < batch and used + n <= budget:
            groups[-1].append(i)
            used += n
        else:
            groups.append([i])
            used = n
    return groups


def pair_logps(model, tok, pairs: list[EvalPair], batch: int, bar) -> list[tuple[float, float]]:
    """Per pair, the summed log-probability of the chosen and of the rejected reply, as the DPO
    objective sees them: each group of pairs is one packed row (training's collator), and the
    model sums each document's labelled targets (`sequence_logps=True`)."""
    from ..data.collate import Collator, row_features
    from ..data.images import preprocess
    from ..data.preference import render_pair
    from ..train.objectives.preference_loss import pairs as fold

    vision = vision_of(model)
    samples = []
    for p in pairs:
        try:
            samples.append(render_pair(p.record, tok, vision, {"base": p.base}))
        except SampleError as e:
            raise UserError(f"eval --data: {e}") from None
    groups = pair_groups([len(s) for s in samples], batch)
    size = model.config.vision.image_size if vision is not None else 0
    collate = Collator(
        tok.pad_id,
        lambda im: preprocess(im["path"], size, im["views"] > 1),
        bucket_to=max(sum(len(samples[i]) for i in g) for g in groups),  # few distinct lengths
    )
    p0 = next(model.parameters())
    out: list[tuple[float, float]] = []
    with torch.no_grad():
        for group in groups:
            b = collate([row_features([samples[i] for i in group])])  # [1, T] each
            pixels = b.get("pixel_values")
            got = model(
                b["input_ids"].to(p0.device),
                pixel_values=None if pixels is None else pixels.to(p0.device, p0.dtype),
                position_ids=b["position_ids"].to(p0.device),
                labels=b["labels"].to(p0.device),
                sequence_logps=True,
            )
            logps, _ = fold(got.logps, got.tokens)  # [P, 2]: chosen, rejected
            if logps.shape[0] != len(group):
                raise RuntimeError(f"{logps.shape[0]} pairs scored in a group of {len(group)}")
            out += [(float(c), float(r)) for c, r in logps.tolist()]
            bar.update(len(group))
    return out


def check_target_fits(target: Target, config, samples: list[EvalSample] | list[EvalPair]) -> None:
    if config.is_multimodal:
        return
    for s in samples:
        if s.has_images:
            raise UserError(
                f"eval: {s.origin}: the sample has an image, but {target.label} is a text-only"
                " model; evaluate a vision (4B+) model or drop the image samples"
            )


def evaluate(
    targets: list[Target],
    samples: list[EvalSample] | list[EvalPair],
    metrics: list[str],
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    backend: str = "ours",
    dtype: str = "auto",
    rewards=None,
) -> list[TargetResult]:
    """Score every target on `samples`, each loaded in turn in one dtype (targets.eval_dtype:
    `auto` is a run's own dtype, else bf16 where bf16 matmuls are native). `rewards`
    (rewarded.RewardEval) answers and scores prompt-only rows for `reward`."""
    from ..progress import bar as progress_bar

    if backend == "llama.cpp":
        check_llama_cpp(targets, metrics)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generating = any(m in GENERATION for m in metrics)
    per_target = len(samples) * (
        int(generating) + sum(m in metrics for m in ("loss", PREFERENCE, REWARD))
    )
    _check_documents(samples, metrics)
    for target in targets:  # every refusal before the first model loads
        check_target_fits(target, target_config(target), samples)
    weights = eval_dtype(targets, dtype) if backend == "ours" else None
    results = []
    with progress_bar(per_target * len(targets), "eval", "sample") as bar:
        for target in targets:
            bar.set_postfix_str(target.label)
            res = TargetResult(target.label)
            res.replies = [None] * len(samples)
            if backend == "llama.cpp":  # generation metrics and loss (check_llama_cpp)
                model, tok = None, llama_cpp.gguf_tokenizer(target.path)
                if generating:
                    res.replies = _llama_cpp_replies(target, tok, samples, max_new_tokens, bar)
            else:
                model, tok = load_target(target, device, weights)
                if generating:
                    res.replies = replies(model, tok, samples, max_new_tokens, batch_size, bar)
            for m in metrics:
                if m == "loss":
                    _score_loss(res, target, model, tok, samples, bar)
                elif m == PREFERENCE:
                    _score_pairs(res, pair_logps(model, tok, samples, batch_size, bar))
                elif m == REWARD:
                    rewards.score(res, model, tok, samples, max_new_tokens, batch_size, bar)
                else:
                    ok = [
                        float(SCORERS[m](r, s.reference))
                        for r, s in zip(res.replies, samples, strict=True)
                    ]
                    res.per_sample[m] = ok
                    res.scores[m] = sum(ok) / len(ok)
            results.append(res)
            del model
    return results


def _score_loss(res: TargetResult, target: Target, model, tok, samples: list, bar) -> None:
    """Mean token cross-entropy and perplexity: our model's, or llama.cpp's (model None)."""
    if model is None:
        docs = [documents(s, tok, None) for s in samples]  # text-only: GGUF import refuses vision
        sums, counts = llama_cpp.token_loss(target.path, docs, bar)
    else:
        sums, counts = token_loss(model, tok, samples, bar, vision_of(model))
    res.per_sample["loss"] = [x / max(c, 1) for x, c in zip(sums, counts, strict=True)]
    res.scores["loss"] = sum(sums) / max(sum(counts), 1)
    res.perplexity = math.exp(min(res.scores["loss"], 50.0))


def _check_documents(samples: list, metrics: list[str]) -> None:
    """Raw text and prompt-completion rows have no reply to generate: `loss` only."""
    doc = next((s for s in samples if getattr(s, "document", None) is not None), None)
    other = [m for m in metrics if m != "loss"]
    if doc is not None and other:
        raise UserError(
            f"eval --metric {other[0]}: {doc.origin} is raw text or a prompt-completion row,"
            " which has no reply to generate; score it with --metric loss"
        )


def _score_pairs(res: TargetResult, logps: list[tuple[float, float]]) -> None:
    """1.0 where the chosen reply is the likelier (strictly: a tie prefers nothing), the share
    of such pairs, and the mean margin chosen - rejected in nats."""
    res.logps = logps
    res.per_sample[PREFERENCE] = [float(c > r) for c, r in logps]
    res.scores[PREFERENCE] = sum(res.per_sample[PREFERENCE]) / len(logps)
    res.margin = sum(c - r for c, r in logps) / len(logps)


def check_llama_cpp(targets: list[Target], metrics: list[str]) -> None:
    """--backend llama.cpp: generation metrics and loss, GGUF files only, llama-cpp-python
    present."""

    ours = [m for m in metrics if m in OURS_ONLY]
    if ours:
        raise UserError(f"eval --metric {ours[0]} runs our model; drop --backend llama.cpp for it")
    for t in targets:
        if t.kind != "gguf":
            raise UserError(f"eval --backend llama.cpp scores .gguf files; {t.label} is not one")
    llama_cpp.require()


def _llama_cpp_replies(
    target: Target, tok, samples: list[EvalSample], max_new_tokens: int | None, bar
):
    max_new_tokens = reply_budget(tok, samples, max_new_tokens)
    prompts = [
        prompt_ids(tok, s, None)[0] for s in samples
    ]  # text-only: GGUF import refuses vision
    ids = llama_cpp.replies(target.path, prompts, max_new_tokens, tok.stop_ids(), bar)
    return [stop_at_call(tok.decode(x)) for x in ids]
