"""`gemma3-tune eval --metric reward --reward SPEC`: a target's completions of prompt-only rows,
scored by the reward functions GRPO trains with (train/rewards.py, `rl.rewards`' specs).

The rows are TRL's prompt-only rows, read and rendered as `objective: grpo` reads them
(data/rl_prompts.py, per target: its tokenizer and image tokens); every other column is passed
to the functions by name, and completions reach them as TRL gives them (text, or an assistant
message for a conversational prompt), with their ids (the stop token included when one was
drawn). Completions come from GRPO's sampler (`generate_groups`: each prompt run once, its
images through the tower once): greedy by default, one per prompt; with `samples` K, K draws
per prompt at `temperature`, each from its own generator seeded by (seed, prompt row, k) as a
GRPO rollout seeds them, so a score repeats exactly and does not depend on `--batch-size`.

Scores, over all completions (a function's None, "does not apply", is left out of its mean):
`rewards/NAME` each function's mean (TRL's `rewards/NAME/mean`), `reward` the mean total (the
functions summed with equal weights; TRL's `reward`), and with K > 1 `best_of_K`, the mean over
prompts of each prompt's best total (pass@K's idea, for a reward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.records import Record, SampleError
from ..data.rl_prompts import check_prompt_only, prompt_and_columns
from ..data.sources import to_turns
from ..data.template import has_images
from ..errors import UserError
from ..train.rewards import RewardFunction
from .model_inputs import pixels, vision_of
from .runner import TargetResult, _read

COMPLETION_TOKENS = 256  # --max-new-tokens' default here: TRL's max_completion_length default

NOT_A_PROMPT = (
    "this row ends on a reply, so it is a chat: --metric reward reads"
    ' prompt-only rows (TRL\'s {"prompt": ...}, with the columns the rewards read); score chats'
    " with --metric exact, json, contains or loss"
)


@dataclass
class EvalPrompt:
    """A prompt-only row, checked once; rendered per target by GRPO's own `rl_prompt`."""

    origin: str  # "file:line"
    record: Record
    base: Path  # the data file's folder: image paths are relative to it, as in training
    prompt: object  # as the row gives it (a string or messages)
    columns: dict  # the row's other columns: the reward functions' keyword arguments
    has_images: bool

    def describe(self) -> dict:
        """The prompt's line in predictions.jsonl (before the targets' results)."""
        return {"origin": self.origin, "prompt": self.prompt, "columns": self.columns}


def _prompt(record: Record, base: Path) -> EvalPrompt:
    turns = to_turns(record, base=base, allow_prompt_only=True)
    check_prompt_only(turns, record.origin, NOT_A_PROMPT)
    prompt, columns = prompt_and_columns(record)
    return EvalPrompt(record.origin, record, base, prompt, columns, has_images(turns))


def load_prompts(path: str | Path, limit: int | None) -> list[EvalPrompt]:
    """The prompt-only rows of a data file (any format training reads), refused before any
    model loads when one ends on a reply."""
    return _read(path, limit, _prompt, "prompts")


def _mean(values: torch.Tensor) -> float | None:
    """The mean of the values that are not NaN; None when none is."""
    kept = values[~values.isnan()]
    return float(kept.mean()) if kept.numel() else None


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def budget(max_new_tokens: int | None) -> int:
    """--max-new-tokens, or TRL's default completion length."""
    return COMPLETION_TOKENS if max_new_tokens is None else max_new_tokens


def _by_prompt(values: torch.Tensor, k: int) -> torch.Tensor:
    """`[N, ...]` prompt-major completions -> `[P, K, ...]`."""
    return values.view(-1, k, *values.shape[1:])


@dataclass
class RewardEval:
    """How `--metric reward` answers and scores the prompts."""

    specs: list[str]  # as given to --reward (rl.rewards' syntax)
    rewards: list[RewardFunction]
    samples: int | None = None  # K sampled completions per prompt; None: one, greedy
    temperature: float = 1.0
    seed: int = 0

    @classmethod
    def load(
        cls, specs: list[str], samples: int | None, temperature: float, seed: int,
        base: Path | None = None,
    ):  # fmt: skip
        """Load the functions now (a missing file or function: one line); relative files
        resolve in `base`: the working directory, as data paths do (a recipe's: its folder)."""
        from ..train.rewards import load_rewards

        specs = list(dict.fromkeys(specs))
        return cls(specs, load_rewards(specs, base or Path.cwd()), samples, temperature, seed)

    @property
    def group(self) -> int:
        return self.samples or 1

    def names(self) -> list[str]:
        """Each function's name (TRL's), or its spec where two functions share a name."""
        names = [r.name for r in self.rewards]
        return [n if names.count(n) == 1 else s for n, s in zip(names, self.specs, strict=True)]

    def describe(self) -> str:
        """The noun of the table's first line."""
        if self.samples is None:
            return "prompts, one greedy completion each"
        return (
            f"prompts x {self.samples} completions, sampled at temperature {self.temperature},"
            f" seed {self.seed}"
        )

    def settings(self, max_new_tokens: int | None) -> dict:
        """What summary.json records of how the scores were made."""
        sampled = self.samples is not None
        return {
            "rewards": self.specs,
            "samples": self.samples,
            "temperature": self.temperature if sampled else 0.0,
            "seed": self.seed if sampled else None,
            "max_new_tokens": budget(max_new_tokens),
        }

    def score(self, res: TargetResult, model, tok, prompts: list[EvalPrompt], max_new_tokens,
              batch: int, bar) -> None:  # fmt: skip
        """Answer every prompt (`group` completions each), score the completions, and fill
        `res`: the scores, each prompt's own (per_sample) and its completions."""
        from ..train.objectives.grpo_loss import combine_rewards
        from ..train.rewards import completion_texts, score

        rendered, ids, cut = self._draw(model, tok, prompts, max_new_tokens, batch, bar)
        as_trl, texts = completion_texts(tok, rendered, ids)
        each = [p for p in rendered for _ in range(self.group)]
        table = score(self.rewards, [p.prompt for p in each], as_trl, ids,
                      [p.columns for p in each], [p.origin for p in each])  # fmt: skip
        total = combine_rewards(table, torch.ones(len(self.rewards)))  # [N]
        names, k = self.names(), self.group
        for f, name in enumerate(names):
            res.scores[f"rewards/{name}"] = _mean(table[:, f])
            res.per_sample[f"rewards/{name}"] = [_mean(x) for x in _by_prompt(table[:, f], k)]
        res.scores["reward"] = _mean(total)
        res.per_sample["reward"] = [_mean(x) for x in _by_prompt(total, k)]
        if k > 1:  # each prompt's best total; NaN (no function applies) counts as no best
            best = _by_prompt(total, k).nan_to_num(nan=-math.inf).max(dim=1).values
            best = best.masked_fill(best == -math.inf, math.nan)
            res.scores[f"best_of_{k}"] = _mean(best)
            res.per_sample[f"best_of_{k}"] = [_number(float(x)) for x in best]
        rows = []
        for i, (text, values) in enumerate(zip(texts, table.tolist(), strict=True)):
            rewards = {name: _number(v) for name, v in zip(names, values, strict=True)}
            rows.append({"text": text, "rewards": rewards, "reward": _number(float(total[i])),
                         "tokens": len(ids[i]), "truncated": cut[i]})  # fmt: skip
        res.completions = [rows[b * k : (b + 1) * k] for b in range(len(rendered))]

    def _draw(self, model, tok, prompts: list[EvalPrompt], max_new_tokens, batch: int, bar):
        """(the prompts rendered for this target, completion ids prompt-major, whether each
        was cut at the budget), `batch` prompts per `generate_groups` call."""
        from ..data.rl_prompts import rl_prompt
        from ..model.generate import generate_groups
        from ..train.objectives.grpo import generators

        vision = vision_of(model)
        try:
            rendered = [rl_prompt(p.record, tok, vision, {"base": p.base}) for p in prompts]
        except SampleError as e:
            raise UserError(f"eval --data: {e}") from None
        device = next(model.parameters()).device
        ids, cut = [], []
        with torch.no_grad():
            for a in range(0, len(rendered), batch):
                chunk = rendered[a : a + batch]
                images = [im for p in chunk for im in p.images]
                features = model.vision_features(pixels(model, images)) if images else None
                got, truncated = generate_groups(
                    model, [p.ids for p in chunk], self.group,
                    generators(self.seed, 0, list(range(a, a + len(chunk))), self.group, device),
                    max_new_tokens=budget(max_new_tokens), stop_ids=tok.stop_ids(),
                    pad_id=tok.pad_id, temperature=self.temperature if self.samples else 0.0,
                    vision_features=features,
                )  # fmt: skip
                ids += got
                cut += truncated
                bar.update(len(chunk))
        return rendered, ids, cut
