"""How a reply is scored against the reference (the sample's last assistant turn).

Generation metrics give 1.0 or 0.0 per sample and average to the fraction of samples that
pass; `loss` generates nothing: it is the mean token cross-entropy over the tokens training
would put the loss on (every assistant turn, its `<end_of_turn>` included), and its perplexity.
`preference` scores preference pairs, not chats: 1.0 where the target gives the chosen reply a
higher summed log-probability than the rejected one (strictly), with the mean margin in nats
(the target's own preference: unlike DPO's rewards/accuracies, no reference model is
subtracted; eval/runner.py `pair_logps`). `reward` scores prompt-only rows with GRPO's reward
functions (`--reward`): the mean reward of the target's greedy or sampled completions
(eval/rewarded.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable

GENERATION = ("exact", "json", "contains")
PREFERENCE = "preference"
REWARD = "reward"
METRICS = (*GENERATION, "loss", PREFERENCE, REWARD)
OURS_ONLY = (PREFERENCE, REWARD)  # our batched log-probs, or our seeded sampler
OWN_DATA = {PREFERENCE: "preference pairs", REWARD: "prompt-only rows"}  # not chats


def exact(reply: str, reference: str) -> bool:
    """Equal after stripping surrounding whitespace."""
    return reply.strip() == reference.strip()


def _parse(text: str) -> tuple[bool, object]:
    try:
        return True, json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return False, None


def json_equal(reply: str, reference: str) -> bool:
    """Both parse as JSON and the values are equal (key order and spacing do not matter)."""
    ok_a, a = _parse(reply)
    ok_b, b = _parse(reference)
    return ok_a and ok_b and a == b


def contains(reply: str, reference: str) -> bool:
    """The reference (stripped) appears in the reply."""
    return reference.strip() in reply


SCORERS: dict[str, Callable[[str, str], bool]] = {
    "exact": exact,
    "json": json_equal,
    "contains": contains,
}
