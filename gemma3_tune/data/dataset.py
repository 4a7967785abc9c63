"""The steps from rendered samples to training rows, and the report `data check` prints.

`prepare.py` runs the pipeline: sources -> validated turns -> template (ids + loss mask)
(samples.py) -> mixing (weights / counts: `mix`) -> eval split (`split_eval`) -> truncation,
never inside an image (`fit_one`) -> packing (`row_indices`) -> rows. This module holds those
steps on samples and their lengths, the `Report` they fill, and the checks of what a run lost.

Nothing is dropped or cut silently: every truncated or dropped sample is counted, with its
file and line, in the report.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .packing import pack
from .records import SampleError
from .settings import DataConfig, Source
from .template import IGNORE, Sample, VisionTokens
from .tokenizer import Tokenizer


class DataErrors(ValueError):
    """Every bad sample found (up to max_errors), one line each."""

    def __init__(self, errors: list[SampleError], more: bool):
        self.errors, self.more = errors, more
        head = f"{len(errors)}{'+' if more else ''} bad sample(s)"
        super().__init__(head + ":\n" + "\n".join(str(e) for e in errors))


@dataclass
class Report:
    samples: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    images: int = 0
    truncated: int = 0
    dropped: int = 0
    lost_tokens: int = 0  # tokens of dropped samples plus tokens cut by truncation
    rows: int = 0
    packing_efficiency: float = 1.0
    eval_samples: int = 0
    text_documents: int = 0  # raw text documents among the training samples
    text_windows: int = 0  # the windows they were cut into (each a training sample)
    sources: list[dict] = field(default_factory=list)  # per train source: what it contributes
    dropped_at: list[str] = field(default_factory=list)  # origins of dropped samples
    truncated_at: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list, repr=False)

    def note(self, dropped: bool, where: str, lost: int) -> None:
        self.lost_tokens += lost
        if dropped:
            self.dropped += 1
            self.dropped_at.append(where)
        else:
            self.truncated += 1
            self.truncated_at.append(where)

    def summary(self) -> dict:
        return {
            "samples": self.samples,
            "tokens": self.tokens,
            "trainable_tokens": self.trainable_tokens,
            "images": self.images,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "lost_tokens": self.lost_tokens,
            "rows": self.rows,
            "packing_efficiency": round(self.packing_efficiency, 4),
            "eval_samples": self.eval_samples,
            "text_documents": self.text_documents,
            "text_windows": self.text_windows,
            "sources": self.sources,
        }


def vision_tokens(model_config) -> VisionTokens | None:
    if not model_config.is_multimodal:
        return None
    return VisionTokens(
        model_config.image_token_id,
        model_config.boi_token_id,
        model_config.eoi_token_id,
        model_config.mm_tokens_per_image,
    )


def mix(samples: list, src: Source, seed: int) -> list:
    """A source's samples (or their indices) as its `weight` or `samples` asks: a seeded share,
    or repeats (each pass in a new seeded order); all of them, in order, when it asks nothing."""
    if src.weight is None and src.samples is None:
        return samples
    want = src.samples if src.samples is not None else round(len(samples) * src.weight)
    rng = random.Random(seed)
    out = []
    while len(out) < want and samples:
        shuffled = samples[:]
        rng.shuffle(shuffled)
        out += shuffled[: want - len(out)]
    return out


def truncate(sample: Sample, max_len: int, vision: VisionTokens | None) -> Sample:
    """Cut to max_len tokens, moving the cut back so no image block is split (an image with
    Pan & Scan crops is kept or dropped whole)."""
    cut = max_len
    if vision is not None and sample.images:
        starts = []  # token index where each image's first block begins
        ends = []  # one past its last block's <end_of_image>
        k = 0
        blocks_left = 0
        for i, t in enumerate(sample.input_ids):
            if t == vision.boi_id:
                if blocks_left == 0:
                    starts.append(i)
                    blocks_left = sample.images[k].views
                    k += 1
            elif t == vision.eoi_id:
                blocks_left -= 1
                if blocks_left == 0:
                    ends.append(i + 1)
        for s, e in zip(starts, ends, strict=False):
            if s < cut < e:
                cut = s
        kept_images = sum(1 for e in ends if e <= cut)
        images = sample.images[:kept_images]
    else:
        images = sample.images
    return Sample(sample.input_ids[:cut], sample.labels[:cut], images, sample.origin)


def split_eval(
    samples: list, fraction: float, seed: int, documents: list | None = None
) -> tuple[list, list]:
    """(train, eval): a seeded `fraction` of the samples (or their indices) held out, in order.
    `documents`: each sample's document; a document's samples (a raw text document's windows)
    then go to one side together, so a held-out loss never scores text trained on."""
    if fraction <= 0 or len(samples) < 2:
        return samples, []
    if documents is not None and len(set(documents)) < len(documents):
        return _split_documents(samples, fraction, seed, documents)
    idx = list(range(len(samples)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, round(len(samples) * fraction))
    held = set(idx[:n_eval])
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


def _split_documents(samples: list, fraction: float, seed: int, documents: list):
    """split_eval by whole documents: seeded documents held out until `fraction` of the
    samples is (at least one document, never all of them)."""
    order = list(dict.fromkeys(documents))
    random.Random(seed).shuffle(order)
    size: dict = {}
    for d in documents:
        size[d] = size.get(d, 0) + 1
    want, held, n = max(1, round(len(samples) * fraction)), set(), 0
    for d in order[:-1]:
        if n >= want:
            break
        held.add(d)
        n += size[d]
    train = [s for s, d in zip(samples, documents, strict=True) if d not in held]
    return train, [s for s, d in zip(samples, documents, strict=True) if d in held]


def _image_tokens(sample: Sample, vision: VisionTokens | None) -> int:
    """Tokens of the sample's image blocks (soft tokens and their boi/eoi markers)."""
    if vision is None or not sample.images:
        return 0
    ids = (vision.image_token_id, vision.boi_id, vision.eoi_id)
    return sum(1 for t in sample.input_ids if t in ids)


def shown(items: list[str], limit: int) -> list[str]:
    """The first `limit` items, then "... and N more" when the list was cut."""
    rest = len(items) - limit
    return list(items[:limit]) + ([f"... and {rest} more"] if rest > 0 else [])


def _crops_note(sample: Sample, vision: VisionTokens | None) -> str:
    """What Pan & Scan crops cost a sample, e.g. " (wide.jpg: 5 views (4 Pan & Scan crops) =
    1,290 image tokens)"; "" when it has none. Crops multiply an image's tokens, so they are
    often what made a sample too long, and nothing else in a note would say so."""
    cropped = [im for im in sample.images if im.views > 1] if vision is not None else []
    if not cropped:
        return ""
    per_view = vision.tokens_per_image + 2  # soft tokens, <start_of_image>, <end_of_image>
    each = [
        f"{Path(im.path).name}: {im.views} views ({im.views - 1} Pan & Scan crops)"
        f" = {im.views * per_view:,} image tokens"
        for im in cropped
    ]
    return f" ({'; '.join(shown(each, 3))})"


def fit_one(
    sample: Sample, cfg: DataConfig, vision: VisionTokens | None
) -> tuple[Sample | None, str]:
    """One sample against max_seq_len: (the sample, cut if needed, or None if dropped; a note
    saying what happened, "" when it fits)."""
    if len(sample) <= cfg.max_seq_len:
        return sample, ""
    if sample.split:  # a preference pair: cutting one side would compare unlike replies
        return None, (
            f"{sample.origin}: the pair takes {len(sample)} tokens (prompt + chosen, prompt +"
            f" rejected) > max_seq_len {cfg.max_seq_len}; a pair is never cut: raise"
            " data.max_seq_len"
        )
    image_tokens = _image_tokens(sample, vision)
    crops = _crops_note(sample, vision)
    if image_tokens > cfg.max_seq_len:  # truncating would cut an image: never
        fix = "lower data.pan_and_scan_max_crops" if crops else "use fewer images"
        return None, (
            f"{sample.origin}: its images alone take {image_tokens} tokens > max_seq_len"
            f" {cfg.max_seq_len}{crops}; raise data.max_seq_len or {fix}"
        )
    if cfg.truncation == "drop":
        return None, (
            f"{sample.origin}: {len(sample)} tokens > max_seq_len {cfg.max_seq_len}{crops}"
        )
    cut = truncate(sample, cfg.max_seq_len, vision)
    if cut.trainable == 0:
        return None, f"{sample.origin}: nothing left to train on after truncation{crops}"
    return cut, f"{sample.origin}: {len(sample)} -> {len(cut)} tokens{crops}"


def row_indices(lengths: list[int], cfg: DataConfig, seed: int) -> list[list[int]]:
    """Rows as lists of sample positions: packed (best fit decreasing), or one sample per row
    in a seeded order."""
    if not cfg.packing:
        order = list(range(len(lengths)))
        random.Random(seed).shuffle(order)
        return [[i] for i in order]
    return pack(lengths, cfg.max_seq_len, seed)


def row_fill(tokens: int, n_rows: int, longest: int, cfg: DataConfig) -> float:
    """Real tokens / the room the rows take (the report's packing_efficiency): max_seq_len per
    row when packed; when not, each batch pads to its longest row, so the longest sample."""
    if not n_rows:
        return 1.0
    return tokens / (n_rows * (cfg.max_seq_len if cfg.packing else longest))


WARN_LOSS = 0.05  # warn when more than this share of samples or tokens is cut or dropped


def data_loss(report: Report, cfg: DataConfig) -> tuple[str | None, str | None]:
    """(warning, refusal) about samples over max_seq_len, each one line or None.

    A warning when over 5% of the training samples, or of their tokens, were truncated or
    dropped; a refusal when over half of the samples were dropped and data.allow_drop is off:
    a recipe that silently trains on a tenth of its data is a mistake far more often than not.
    """
    total = report.samples + report.dropped
    tokens = report.tokens + report.lost_tokens
    if not total:
        return None, None
    fix = "raise data.max_seq_len"
    if cfg.pan_and_scan:  # each crop costs a whole image's tokens
        fix += ", lower data.pan_and_scan_max_crops"
    if cfg.truncation == "drop":
        fix += " or set data.truncation: truncate"
    share = (report.truncated + report.dropped) / total
    token_share = report.lost_tokens / max(tokens, 1)
    warning = refusal = None
    if share > WARN_LOSS or token_share > WARN_LOSS:
        warning = (
            f"warning: {report.dropped} of {total} samples dropped and {report.truncated}"
            f" truncated ({share:.0%}; {report.lost_tokens:,} of {tokens:,} tokens,"
            f" {token_share:.0%}) at data.max_seq_len {cfg.max_seq_len}; {fix}"
        )
    if report.dropped > total / 2 and not cfg.allow_drop:
        refusal = (
            f"data: {report.dropped} of {total} samples ({report.dropped / total:.0%}) are over"
            f" data.max_seq_len {cfg.max_seq_len} and would be dropped; {fix}, or set"
            " data.allow_drop: true to train on the rest"
        )
    return warning, refusal


def histogram(lengths, max_len: int, bins: int = 8) -> list[tuple[int, int, int]]:
    """(low, high, count) buckets over 0..max_len. lengths: a list or a numpy array."""
    width = max(1, -(-max_len // bins))
    which = np.minimum(np.asarray(lengths, dtype=np.int64) // width, bins - 1)
    counts = np.bincount(which, minlength=bins)
    return [(b * width, min((b + 1) * width, max_len), int(counts[b])) for b in range(bins)]


def render_mask(
    sample: Sample, tok: Tokenizer, color: bool, image_token_id: int | None = None
) -> str:
    """The sample's text with trained spans visible: green in a terminal, [[...]] otherwise."""
    out, run, trained = [], [], None

    def flush():
        if not run:
            return
        text = tok.decode(run, skip_special=False)
        if trained:
            out.append(f"\x1b[32m{text}\x1b[0m" if color else f"[[{text}]]")
        else:
            out.append(text)

    i = 0
    ids = sample.input_ids
    while i < len(ids):
        if image_token_id is not None and ids[i] == image_token_id:
            j = i
            while j < len(ids) and ids[j] == image_token_id:
                j += 1
            flush()
            run, trained = [], None
            out.append(f"<image_soft_token x{j - i}>")
            i = j
            continue
        t = sample.labels[i] != IGNORE
        if trained is not None and t != trained:
            flush()
            run = []
        trained = t
        run.append(ids[i])
        i += 1
    flush()
    return "".join(out)
