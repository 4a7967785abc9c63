"""`gemma3-tune data check RECIPE.yaml`: validate every sample and show what training will see."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..data.dataset import DataErrors, data_loss, histogram, render_mask, shown
from ..data.template import Sample
from .recipe import Recipe, load_recipe
from .run_data import load_data, tokenizer_and_config


def _distill_data(recipe: Recipe):
    """A distillation recipe's data, with the teacher's answers to prompt-only samples; None
    (after one line saying so) while some are unanswered: `train` has the teacher answer them
    first, and until then their rows cannot be rendered. Every sample is validated either way."""
    from .objectives.distill import prompts_and_store
    from .objectives.teacher import resolve_teacher

    tok, cfg = tokenizer_and_config(recipe)
    spec = resolve_teacher(recipe)
    prompts, store, missing = prompts_and_store(recipe, spec, tok, cfg)
    if prompts:
        print(
            f"prompt-only        {len(prompts)} samples end on a user turn; the teacher"
            f" ({recipe.distill.teacher}) has answered {len(prompts) - missing}",
            file=sys.stdout,
        )
    if missing:
        print(
            f"                   {missing} await the teacher's answer: `gemma3-tune train` has it"
            " answer them first (then `data check` shows the rows)",
            file=sys.stdout,
        )
        return None
    return load_data(recipe, answers=store, prompts=prompts if store is not None else None)


def _print_errors(e: DataErrors) -> int:
    for err in e.errors:
        print(f"error: {err}", file=sys.stderr)
    if len(e.errors) > 1 or e.more:  # one mistake, one line; several get a count
        more = " (and more; raise data.max_errors to see them)" if e.more else ""
        print(
            f"error: {len(e.errors)} bad sample(s){more}; fix them and run data check again",
            file=sys.stderr,
        )
    return 2


def _qat_data(recipe: Recipe) -> Recipe | None:
    """The data a QAT recipe trains on (train/qat_data.py); None, after a line saying so, while
    the checkpoint's own text is not sampled yet (`train` samples it first)."""
    from .qat_data import resolve

    resolved = resolve(recipe, sample=False)
    if resolved is None:
        g = recipe.qat.generate
        print(
            f"self text          {g.samples} texts of qat.data's `self` await sampling:"
            " `gemma3-tune train` samples them first (then `data check` shows the rows)"
        )
    return resolved


def prepare_only(recipe_path: str, overrides: list[str]) -> int:
    """`gemma3-tune data prepare`: build the cache ahead of training (as `axolotl preprocess`)."""
    recipe = _qat_data(load_recipe(recipe_path, overrides))
    if recipe is None:
        return 0
    try:
        _, _, data = load_data(recipe)
    except DataErrors as e:
        return _print_errors(e)
    how = "prepared now" if data.built else "already prepared"
    print(
        f"data: {data.folder} ({how}; {data.report.samples} samples, {data.report.rows} rows,"
        f" rows digest {data.digest()})"
    )
    return 0


LISTED = 10  # truncated/dropped samples, and cropped images, listed by name


def train_image_views(data) -> tuple[np.ndarray, list[str]]:
    """Views (1 + Pan & Scan crops) of every image of the training samples, in training
    order with repeats (as the `images` count has them), and a "name: N crops" line for
    each distinct cropped image (the first LISTED, then "... and N more"). Read from the
    prepared Arrow columns, not sample by sample."""
    import pyarrow.compute as pc

    rows = data.train_rows
    images = pc.list_flatten(rows.samples.data.column("images").take(rows.members))
    views = pc.struct_field(images, "views").to_numpy(zero_copy_only=False)  # [images]
    cropped_views = views[views > 1]
    cropped = pc.struct_field(images, "path").filter(pc.greater(views, 1))
    distinct = pc.unique(cropped).to_pylist()  # in order of first appearance
    lines = [
        f"{Path(p).name}: {cropped_views[pc.index(cropped, p).as_py()] - 1} crops"
        for p in distinct[:LISTED]
    ]
    return views, shown(lines + distinct[LISTED:], LISTED)  # the rest only counted


def crop_counts(views: np.ndarray) -> dict:
    """The crop counts `data check --json` adds: images with crops, crops in all, and how
    many images have each number of crops ({"0": images without, "4": with 4, ...})."""
    crops = views.astype(np.int64) - 1
    per = np.bincount(crops) if len(crops) else np.zeros(0, np.int64)
    return {
        "cropped_images": int((crops > 0).sum()),
        "crops": int(crops.sum()),
        "crops_per_image": {str(k): int(n) for k, n in enumerate(per) if n},
    }


def _print_crops(c: dict, images: int, listed: list[str], tokens_per_view: int, out) -> None:
    """`c`: crop_counts of the `images` training images."""
    print(
        f"pan & scan crops   {c['cropped_images']} of {images} images cropped,"
        f" {c['crops']} crops (+{c['crops'] * tokens_per_view:,} image tokens)",
        file=out,
    )
    if c["crops"]:
        hist = ", ".join(f"{n} with {k}" for k, n in c["crops_per_image"].items())
        print(f"  images by crops  {hist}", file=out)
    for line in listed:
        print(f"  {line}", file=out)


def documents(sample: Sample) -> list[tuple[str, Sample]]:
    """A sample as data check shows it: one document, or a pair's two (scored: the replies)."""
    if not sample.split:
        return [("", sample)]
    k = sample.split
    first = len(sample.images) // 2  # the prompt's images, in each document
    return [
        ("prompt + chosen", Sample(sample.input_ids[:k], sample.labels[:k], sample.images[:first])),
        (
            "prompt + rejected",
            Sample(sample.input_ids[k:], sample.labels[k:], sample.images[first:]),
        ),
    ]


def _rl_check(recipe: Recipe, as_json: bool) -> int:
    """objective: grpo: the prompts (and their other columns), and the reward functions."""
    from .objectives import build
    from .refusals import refuse

    refuse(recipe)  # the reward functions load
    objective = build(recipe)
    try:
        tok, _, data = objective.prepare()
    except DataErrors as e:
        return _print_errors(e)
    r, out = data.report, sys.stdout
    print(f"prompts            {r.samples}  (+{r.eval_samples} eval)", file=out)
    print(f"prompt tokens      {r.tokens}", file=out)
    print(f"images             {r.images}", file=out)
    room = recipe.data.max_seq_len - recipe.rl.max_completion_length
    print(f"dropped            {r.dropped}  (longer than {room} tokens: max_seq_len less"
          " rl.max_completion_length)", file=out)  # fmt: skip
    for where in shown(r.dropped_at, LISTED):
        print(f"  {where}", file=out)
    names = ", ".join(f.name for f in objective.rewards)
    print(f"rewards            {names}", file=out)
    if data.train:
        first = data.train[0]
        columns = ", ".join(first.columns) or "none"
        print(f"\nfirst prompt ({first.origin}), columns for the rewards: {columns}", file=out)
        print(tok.decode(first.ids), file=out)
    if as_json:
        print(json.dumps(r.summary()), file=out)
    warning, refusal = data_loss(r, recipe.data)
    if warning:
        print(warning, file=sys.stderr)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    return 0


def _print_sources(r, out) -> None:
    """Raw text documents and windows, and each source's share of the trained tokens (what
    mixing weights actually give), when there is more than one source or any raw text."""
    if r.text_windows:
        print(f"raw text           {r.text_documents} documents in {r.text_windows} windows"
              " (each window its own document, opening with <bos>)", file=out)  # fmt: skip
    if len(r.sources) > 1 or r.text_windows:
        print("sources            share of trained tokens", file=out)
        for s in r.sources:
            print(f"  {s['share']:>6.1%}  {s['trainable_tokens']:>10} of {s['tokens']} tokens"
                  f"  {s['samples']:>7} samples  {s['path']}", file=out)  # fmt: skip


def _print_context_parallel(recipe: Recipe, cfg, out) -> None:
    """training.context_parallel: the shard, the halo and the bytes each layer type sends."""
    from ..model.dtypes import resolve_dtype
    from .context import check_rows, plan

    n, row = recipe.training.context_parallel, recipe.data.max_seq_len
    if n == 1:
        return
    check_rows(row, n, cfg.sliding_window)
    nbytes = resolve_dtype(recipe.model.dtype).itemsize
    print(plan(n, row, recipe.training.micro_batch_size, cfg, nbytes), file=out)


def run(recipe_path: str, overrides: list[str], as_json: bool) -> int:
    recipe = load_recipe(recipe_path, overrides)
    if recipe.objective == "grpo":  # prompts, not samples to train on
        return _rl_check(recipe, as_json)
    recipe = _qat_data(recipe)
    if recipe is None:
        return 0
    try:
        if recipe.distill is None:
            tok, cfg, data = load_data(recipe)
        else:
            loaded = _distill_data(recipe)
            if loaded is None:
                return 0
            tok, cfg, data = loaded
    except DataErrors as e:
        return _print_errors(e)
    r = data.report
    out = sys.stdout
    how = "prepared now" if data.built else "from the cache"
    print(f"prepared data      {data.folder} ({how})", file=out)
    unit = " pairs" if recipe.objective != "sft" else ""
    print(f"samples            {r.samples}{unit}  (+{r.eval_samples} eval)", file=out)
    print(f"tokens             {r.tokens}", file=out)
    print(f"trainable tokens   {r.trainable_tokens}", file=out)
    _print_sources(r, out)
    print(f"images             {r.images}", file=out)
    print(f"truncated          {r.truncated}", file=out)
    print(f"dropped            {r.dropped}", file=out)
    print(f"tokens lost        {r.lost_tokens}  (cut or dropped at max_seq_len)", file=out)
    for where in shown(r.truncated_at + r.dropped_at, LISTED):
        print(f"  {where}", file=out)
    crops: dict = {}
    if recipe.data.pan_and_scan and cfg.is_multimodal:
        views, listed = train_image_views(data)
        crops = crop_counts(views)
        _print_crops(crops, len(views), listed, cfg.mm_tokens_per_image + 2, out)  # + boi, eoi
    mode = "packed" if recipe.data.packing else "padded"
    print(f"rows ({mode})      {r.rows} x {recipe.data.max_seq_len} tokens", file=out)
    print(f"packing efficiency {r.packing_efficiency:.1%}", file=out)
    _print_context_parallel(recipe, cfg, out)
    print("length histogram:", file=out)
    hist = histogram(r.lengths, recipe.data.max_seq_len)
    top = max((c for *_, c in hist), default=1) or 1
    for lo, hi, c in hist:
        print(f"  {lo:>6}-{hi:<6} {'#' * round(30 * c / top):<30} {c}", file=out)
    if data.example is not None:
        color = out.isatty()
        legend = "green" if color else "[[...]]"
        print(f"\nfirst sample ({data.example.origin}), trained tokens in {legend}:", file=out)
        img = cfg.image_token_id if cfg.is_multimodal else None
        for title, doc in documents(data.example):
            if title:
                print(f"--- {title}", file=out)
            print(render_mask(doc, tok, color, img), file=out)
    if as_json:
        summary = {**r.summary(), "cache": str(data.folder)}
        summary.update(crops or crop_counts(np.ones(r.images, np.int64)))  # off: no crops
        print(json.dumps(summary), file=out)
    warning, refusal = data_loss(r, recipe.data)
    if warning:
        print(warning, file=sys.stderr)
    if refusal:  # `train` would refuse this data: so does the check
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    return 0
