"""`qat.data`: what a QAT run trains on, before anything else reads the recipe's data.

Entries take data.train's forms (a path, or `{path, weight | samples}`), mixed the same way,
plus two names: `train` (data.train's sources, as they are) and `self` (text the unquantized
checkpoint samples from `<bos>`, data/self_text.py, settings in `qat.generate`). A user with
only a task set can so keep the general model: `[train, self]`; a base model needs no data at
all: `[self]`. Unset, QAT trains on data.train.

The self text is cached under the data cache (`self_text/KEY/`), keyed by the checkpoint's
fingerprint, the generation settings and the seed: generated once by local rank 0 (the other
ranks wait), reused by every later run and by `data check`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..data.settings import Source, data_root
from .recipe import DistillSection, Recipe


def resolve(recipe: Recipe, sample: bool = True) -> Recipe | None:
    """The recipe with data.train replaced by qat.data's sources (`self` sampled now if need
    be; with `sample` False, None while it is not: `data check` loads no model); the recipe
    itself when qat.data is unset."""
    q = recipe.qat
    if q is None or q.data is None:
        return recipe
    sources: list[Source] = []
    for s in q.data:
        if s.path == "train":
            sources += recipe.data.train
        elif s.path == "self":
            path = self_text(recipe, sample)
            if path is None:
                return None
            sources.append(s.model_copy(update={"path": str(path)}))
        else:
            sources.append(s)
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"train": sources})})


def self_text(recipe: Recipe, sample: bool = True) -> Path | None:
    """The training file of the checkpoint's own text: from the cache, or sampled now (None
    when it is not cached and `sample` is False)."""
    from ..data import self_text as st
    from ..data.teacher_cache import cache_key
    from ..model.dtypes import resolve_dtype
    from .distributed import device, wait_for_local_main
    from .objectives.teacher import LazyTeacher, resolve_teacher
    from .run_data import tokenizer_and_config

    checkpoint = DistillSection(teacher=recipe.model.path)
    spec = resolve_teacher(recipe.model_copy(update={"distill": checkpoint}))
    g = recipe.qat.generate
    key = {"model": spec.fingerprint, **g.model_dump(), "seed": recipe.training.seed}
    folder = data_root(recipe.data, recipe.base_dir) / "self_text" / cache_key(key)
    if st.complete(folder):
        return folder / st.FILE
    if not sample:
        return None
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        wait_for_local_main(lambda: st.complete(folder), "sample the self text")
        return folder / st.FILE
    tok, _ = tokenizer_and_config(recipe)
    print(f"qat.data self: sampling {g.samples} texts from {recipe.model.path}", file=sys.stderr)
    model = LazyTeacher(spec, resolve_dtype(recipe.model.dtype), device()).get()
    return st.sample_texts(
        model,
        tok,
        folder,
        samples=g.samples,
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        seed=recipe.training.seed,
    )
