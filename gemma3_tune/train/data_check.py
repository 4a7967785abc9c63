"""`gemma3-tune data check RECIPE.yaml`: validate every sample and show what training will see."""

from __future__ import annotations

import json
import sys

from ..data.dataset import DataErrors, data_loss, histogram, render_mask
from ..data.tokenizer import Tokenizer
from ..errors import UserError
from .recipe import Recipe, load_recipe, model_dir


def load_data(recipe: Recipe):
    """Tokenizer, model config and prepared data for a recipe: from the cache when these
    inputs were prepared before, else prepared now (DataErrors propagate)."""
    from ..data.prepare import prepare
    from ..model.checkpoint import read_config

    folder = model_dir(recipe)
    try:
        tok = Tokenizer(folder)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"model.path: {e}") from None
    cfg = read_config(folder)
    data = prepare(recipe.data, folder, cfg, recipe.base_dir, recipe.training.seed)
    return tok, cfg, data


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


def prepare_only(recipe_path: str, overrides: list[str]) -> int:
    """`gemma3-tune data prepare`: build the cache ahead of training (as `axolotl preprocess`)."""
    recipe = load_recipe(recipe_path, overrides)
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


def run(recipe_path: str, overrides: list[str], as_json: bool) -> int:
    recipe = load_recipe(recipe_path, overrides)
    try:
        tok, cfg, data = load_data(recipe)
    except DataErrors as e:
        return _print_errors(e)
    r = data.report
    out = sys.stdout
    how = "prepared now" if data.built else "from the cache"
    print(f"prepared data      {data.folder} ({how})", file=out)
    print(f"samples            {r.samples}  (+{r.eval_samples} eval)", file=out)
    print(f"tokens             {r.tokens}", file=out)
    print(f"trainable tokens   {r.trainable_tokens}", file=out)
    print(f"images             {r.images}", file=out)
    print(f"truncated          {r.truncated}", file=out)
    print(f"dropped            {r.dropped}", file=out)
    print(f"tokens lost        {r.lost_tokens}  (cut or dropped at max_seq_len)", file=out)
    for where in (r.truncated_at + r.dropped_at)[:10]:
        print(f"  {where}", file=out)
    mode = "packed" if recipe.data.packing else "padded"
    print(f"rows ({mode})      {r.rows} x {recipe.data.max_seq_len} tokens", file=out)
    print(f"packing efficiency {r.packing_efficiency:.1%}", file=out)
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
        print(render_mask(data.example, tok, color, img), file=out)
    if as_json:
        print(json.dumps({**r.summary(), "cache": str(data.folder)}), file=out)
    warning, refusal = data_loss(r, recipe.data)
    if warning:
        print(warning, file=sys.stderr)
    if refusal:  # `train` would refuse this data: so does the check
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    return 0
