"""From a recipe's `data:` section to training rows, and the report `data check` prints.

sources -> validated turns -> template (ids + loss mask) -> mixing (weights / counts) ->
eval split -> truncation (never inside an image) -> packing -> rows.

Nothing is dropped or cut silently: every truncated or dropped sample is counted, with its
file and line, in the report.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .packing import pack
from .settings import DataConfig, Source, image_store
from .sources import SampleError, read_records, to_turns
from .template import IGNORE, Sample, VisionTokens, has_images, render
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
        }


@dataclass
class Data:
    train_rows: list[list[Sample]]
    eval_rows: list[list[Sample]]
    report: Report
    example: Sample | None = None


def vision_tokens(model_config) -> VisionTokens | None:
    if not model_config.is_multimodal:
        return None
    return VisionTokens(
        model_config.image_token_id,
        model_config.boi_token_id,
        model_config.eoi_token_id,
        model_config.mm_tokens_per_image,
    )


def load_samples(
    sources: list[Source],
    cfg: DataConfig,
    tok: Tokenizer,
    vision: VisionTokens | None,
    base: Path,
    seed: int,
) -> list[Sample]:
    """Read, validate and render every sample; raise DataErrors listing the bad ones."""
    errors: list[SampleError] = []
    more = False
    out: list[Sample] = []
    image_root = Path(cfg.image_root) if cfg.image_root else None
    if image_root is not None and not image_root.is_absolute():
        image_root = base / image_root
    pas_args = {
        "min_crop_size": cfg.pan_and_scan_min_crop_size,
        "max_crops": cfg.pan_and_scan_max_crops,
        "min_ratio": cfg.pan_and_scan_min_ratio,
    }

    store = image_store(cfg)
    for src in sources:
        path = Path(src.path) if Path(src.path).is_absolute() else base / src.path
        these: list[Sample] = []
        try:
            for rec in read_records(path):
                try:
                    turns = to_turns(
                        rec,
                        image_root=image_root,
                        pan_and_scan=cfg.pan_and_scan,
                        pas_args=pas_args,
                        base=path if path.is_dir() else path.parent,  # images beside the data
                        image_store=store,
                    )
                    if vision is None and has_images(turns):
                        raise SampleError(
                            rec.origin,
                            "has an image, but the model is text-only (use a 4B+ Gemma 3)",
                        )
                    sample = render(turns, tok, vision, cfg.train_on)
                    sample.origin = rec.origin
                    these.append(sample)
                except SampleError as e:
                    if len(errors) < cfg.max_errors:
                        errors.append(e)
                    else:
                        more = True
        except SampleError as e:  # the whole source is unreadable
            errors.append(e)
            continue
        out += _mix(these, src, seed)
    if errors:
        raise DataErrors(errors, more)
    return out


def _mix(samples: list[Sample], src: Source, seed: int) -> list[Sample]:
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
    samples: list[Sample], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    if fraction <= 0 or len(samples) < 2:
        return samples, []
    idx = list(range(len(samples)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, round(len(samples) * fraction))
    held = set(idx[:n_eval])
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


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


def fit(
    samples: list[Sample], cfg: DataConfig, vision: VisionTokens | None, report: Report | None
) -> list[Sample]:
    """Apply truncation / dropping for samples over max_seq_len, counting each."""
    out = []
    for s in samples:
        kept, note = fit_one(s, cfg, vision)
        if note and report is not None:
            report.note(kept is None, note, len(s) - (len(kept) if kept else 0))
        if kept is not None:
            out.append(kept)
    return out


def row_indices(lengths: list[int], cfg: DataConfig, seed: int) -> list[list[int]]:
    """Rows as lists of sample positions: packed (best fit decreasing), or one sample per row
    in a seeded order."""
    if not cfg.packing:
        order = list(range(len(lengths)))
        random.Random(seed).shuffle(order)
        return [[i] for i in order]
    return pack(lengths, cfg.max_seq_len, seed)


def to_rows(samples: list[Sample], cfg: DataConfig, seed: int) -> list[list[Sample]]:
    return [[samples[i] for i in row] for row in row_indices([len(s) for s in samples], cfg, seed)]


def row_fill(tokens: int, n_rows: int, longest: int, cfg: DataConfig) -> float:
    """Real tokens / the room the rows take (the report's packing_efficiency): max_seq_len per
    row when packed; when not, each batch pads to its longest row, so the longest sample."""
    if not n_rows:
        return 1.0
    return tokens / (n_rows * (cfg.max_seq_len if cfg.packing else longest))


def build(cfg: DataConfig, tok: Tokenizer, model_config, base: Path, seed: int = 0) -> Data:
    """Everything `train` and `data check` need; raises DataErrors on any bad sample."""
    vision = vision_tokens(model_config)
    train = load_samples(cfg.train, cfg, tok, vision, base, seed)
    if cfg.eval:
        evals = load_samples(cfg.eval, cfg, tok, vision, base, seed)
    else:
        train, evals = split_eval(train, cfg.eval_split, seed)
    report = Report()
    train = fit(train, cfg, vision, report)
    example = train[0] if train else None  # the first sample training sees (never a dropped one)
    evals = fit(evals, cfg, vision, None)
    rows = to_rows(train, cfg, seed)
    report.samples = len(train)
    report.eval_samples = len(evals)
    report.tokens = sum(len(s) for s in train)
    report.trainable_tokens = sum(s.trainable for s in train)
    report.images = sum(len(s.images) for s in train)
    report.rows = len(rows)
    report.lengths = [len(s) for s in train]
    report.packing_efficiency = row_fill(
        report.tokens, len(rows), max(report.lengths, default=0), cfg
    )
    return Data(
        rows,
        [[s] for s in evals] if not cfg.packing else to_rows(evals, cfg, seed),
        report,
        example,
    )


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
