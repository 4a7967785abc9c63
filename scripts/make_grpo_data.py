"""Generate the GRPO example's prompts: contact details in phrasings the quickstart never saw.

    prompt: "Give this person's details as JSON with the keys name, age, city and phone.\n\n
             Caller ID 555-4283: Priya Moore, a 46-year-old from Miami."
    answer: {"name": "Priya Moore", "age": 46, "city": "Miami", "phone": "555-4283"}

The quickstart's full fine-tune (24 steps) gets 77.5% of the held-out ones exactly right (it
leaves the JSON open after "- tel. 555-0071", an answer whose closing brace it almost never
samples, so no reward can teach it that); its 12-step checkpoint writes the right card but
rarely ends its turn. recipes/grpo-contacts.yaml trains that checkpoint on the prompts with the
`json_equal:answer` reward alone (no reply is ever shown to it); heldout.jsonl holds other
prompts of the same templates as chats (`eval --metric json`), heldout_prompts.jsonl the same
prompts with their answers (`eval --metric reward --reward json_equal:answer`).
Deterministic: `python scripts/make_grpo_data.py` rewrites data/grpo/ identically.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_quickstart_data import CITIES, FIRST, LAST  # noqa: E402

TEMPLATES = [
    "Our new member is {name}. Lives in {city}, turned {age} this year, mobile {phone}.",
    "Caller ID {phone}: {name}, a {age}-year-old from {city}.",
    "{name} ({city}) - {age} yrs - tel. {phone}",
    "Record: {name}; hometown {city}; {age} years; dial {phone}.",
    "Met {name} today. {age}, from {city}. Said to text {phone}.",
    "Applicant {name}, {age}, currently in {city}, reachable at {phone}.",
]
INSTRUCTION = "Give this person's details as JSON with the keys name, age, city and phone."


def example(rng: random.Random) -> tuple[str, dict]:
    card = {
        "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "age": rng.randint(18, 90),
        "city": rng.choice(CITIES),
        "phone": f"555-{rng.randint(0, 9999):04d}",
    }
    return f"{INSTRUCTION}\n\n{rng.choice(TEMPLATES).format(**card)}", card


def main(out: Path = Path("data/grpo"), train: int = 240, heldout: int = 40) -> None:
    rng = random.Random(7)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "prompts.jsonl", "w") as f:
        for _ in range(train):
            prompt, card = example(rng)
            f.write(json.dumps({"prompt": prompt, "answer": card}) + "\n")
    held = [example(rng) for _ in range(heldout)]
    with open(out / "heldout.jsonl", "w") as f:  # chats: eval --metric json
        for prompt, card in held:
            chat = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": json.dumps(card)},
            ]
            f.write(json.dumps({"messages": chat}) + "\n")
    with open(out / "heldout_prompts.jsonl", "w") as f:  # the same: eval --metric reward
        for prompt, card in held:
            f.write(json.dumps({"prompt": prompt, "answer": card}) + "\n")
    print(f"wrote {train} prompts and {heldout} held-out chats and prompts to {out}")


if __name__ == "__main__":
    main()
