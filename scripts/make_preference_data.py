"""Generate the DPO example: the quickstart's contact cards, preferring international phone numbers.

    prompt:   "Turn this into a JSON contact card.\\n\\nHey, Maria Lopez here. ... Call me on 555-0142."
    chosen:   {"name": "Maria Lopez", "age": 34, "city": "Denver", "phone": "+1 555-0142"}
    rejected: {"name": "Maria Lopez", "age": 34, "city": "Denver", "phone": "555-0142"}

The replies differ only in the phone number's format: the chosen one adds the country code the
request never states, the rejected one copies the number as written. A base model prefers the
copy (its log-probability is higher, measured in docs/preference.md), so the preference is one DPO has
to teach, not one the model already holds.

Also written: `sft_check.jsonl`, the quickstart's 60 held-out requests as pairs of the correct
card (chosen) against a card with one wrong field (rejected: another age, city or name), both
in the quickstart's phone format. It checks that preference tuning keeps the model preferring
correct answers on the SFT task (no collapse).
Deterministic: `python scripts/make_preference_data.py` rewrites data/preference/ identically.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from make_quickstart_data import CITIES, FIRST, INSTRUCTION, sample

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "preference"


def pair(rng: random.Random) -> dict:
    chat = sample(rng)["messages"]
    card = json.loads(chat[1]["content"])
    chosen = {**card, "phone": "+1 " + card["phone"]}
    return {
        "prompt": chat[0]["content"],
        "chosen": json.dumps(chosen),
        "rejected": json.dumps(card),
    }


def wrong(card: dict, rng: random.Random) -> dict:
    """The card with one field changed to a plausible wrong value."""
    field = rng.choice(["age", "city", "name"])
    bad = dict(card)
    if field == "age":
        bad["age"] = card["age"] + rng.choice([-11, -7, 5, 9])
    elif field == "city":
        bad["city"] = rng.choice([c for c in CITIES if c != card["city"]])
    else:
        first, last = card["name"].split(" ", 1)
        bad["name"] = f"{rng.choice([f for f in FIRST if f != first])} {last}"
    return bad


def sft_check(rng: random.Random) -> list[dict]:
    rows = []
    for line in (ROOT / "data/quickstart/eval.jsonl").read_text().splitlines():
        chat = json.loads(line)["messages"]
        card = json.loads(chat[1]["content"])
        rows.append(
            {
                "prompt": chat[0]["content"],
                "chosen": chat[1]["content"],
                "rejected": json.dumps(wrong(card, rng)),
            }
        )
    return rows


def main(out: Path = OUT, seed: int = 11) -> None:
    assert INSTRUCTION  # the quickstart's instruction opens every prompt
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 160), ("eval", 60)):
        rows = [pair(rng) for _ in range(n)]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    check = sft_check(rng)
    (out / "sft_check.jsonl").write_text("".join(json.dumps(r) + "\n" for r in check))
    print(f"wrote {out}/train.jsonl (160 pairs), eval.jsonl (60) and sft_check.jsonl (60)")


if __name__ == "__main__":
    main()
