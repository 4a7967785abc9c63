"""Training objectives: one module each behind one interface (base.py), and this registry.

A recipe's objective is its `objective:` key, except that SFT with a teacher (a `distill:`
section, or QAT's `target: teacher`) distils. Adding one: its name in the recipe schema's
`objective` Literal (recipe.py), one module with an `Objective` subclass, and one line here
(docs/objectives.md walks through it). Modules are imported when a run asks for them.
"""

from __future__ import annotations

import importlib

from ..recipe import Recipe

REGISTRY: dict[str, str] = {  # name -> "module:class" in this package
    "sft": "sft:SFT",
    "distill": "distill:Distillation",
    "dpo": "preference:Preference",
    "orpo": "preference:Preference",
    "grpo": "grpo:GRPO",
}


def name(recipe: Recipe) -> str:
    """The registry name of a recipe's objective."""
    q = recipe.qat
    teacher = recipe.distill is not None or (q is not None and q.target == "teacher")
    return "distill" if recipe.objective == "sft" and teacher else recipe.objective


def objective_class(recipe: Recipe) -> type:
    module, cls = REGISTRY[name(recipe)].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def build(recipe: Recipe):
    """The recipe's objective (an `Objective`), ready to prepare its data."""
    return objective_class(recipe)(recipe)
