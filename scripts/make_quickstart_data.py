"""Generate the quickstart task: free-text self-introductions -> a fixed JSON contact card.

    user:      "Hey, Maria Lopez here. 34 years old, living in Denver. Call me on 555-0142."
    assistant: {"name": "Maria Lopez", "age": 34, "city": "Denver", "phone": "555-0142"}

The base Gemma 3 270M continues such text instead of answering in the schema; a few minutes of
LoRA teach it. Scored by parsing the reply as JSON and comparing every field exactly.
Deterministic: `python scripts/make_quickstart_data.py` rewrites data/quickstart/ identically.
prompts.jsonl holds train.jsonl's requests alone (no assistant turn): the distillation example
(recipes/distill-quickstart.yaml) has the fine-tuned model answer them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FIRST = (
    "Maria Liam Olivia Noah Emma Oliver Ava Elijah Sophia Lucas Mia Mateo Amelia Levi Harper "
    "Ezra Aria James Luna Leo Chloe Aiden Nora Kai Zoe Omar Fatima Yuki Priya Arjun Ingrid Lars "
    "Chen Mei Diego Lucia Kofi Amara Ivan Elena"
).split()
LAST = (
    "Lopez Smith Johnson Brown Garcia Miller Davis Wilson Anderson Taylor Thomas Moore Martin "
    "Jackson Lee Clark Lewis Walker Young King Wright Scott Green Baker Adams Nelson Hill Campbell "
    "Mitchell Roberts Carter Phillips Evans Turner Torres Parker Collins Edwards Stewart Morris"
).split()
CITIES = (
    "Denver Austin Boston Chicago Seattle Portland Miami Atlanta Dallas Phoenix Oslo Lisbon Madrid "
    "Berlin Vienna Prague Dublin Lyon Milan Zurich Tokyo Osaka Seoul Lima Quito Nairobi Accra Cairo "
    "Sydney Perth Auckland Toronto Montreal Calgary Houston Tampa Raleigh Omaha Tucson Boise"
).split()

TEMPLATES = [
    "Hi, I'm {name} from {city}. I am {age} years old and my number is {phone}.",
    "Hey, {name} here. {age} years old, living in {city}. Call me on {phone}.",
    "My name is {name}, I'm {age}, and I live in {city}. Phone: {phone}.",
    "This is {name} ({age}) in {city}; you can reach me at {phone}.",
    "{name}, age {age}, based in {city}. Best number: {phone}.",
    "Hello! {name} speaking. I moved to {city} last year, I'm {age}. My phone is {phone}.",
    "Please add {name} to the list: {age} years old, lives in {city}, phone {phone}.",
    "New customer: {name}. City: {city}. Age: {age}. Contact: {phone}.",
    "You can call {name} at {phone}. They are {age} and live in {city}.",
    "I'm {age} and my name is {name}. I'm writing from {city}, number {phone}.",
    "Contact {name} in {city} on {phone} (age {age}).",
    "Greetings from {city}! I am {name}, {age} years young. Ring me at {phone}.",
]
INSTRUCTION = "Turn this into a JSON contact card."


def sample(rng: random.Random) -> dict:
    card = {
        "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "age": rng.randint(18, 89),
        "city": rng.choice(CITIES),
        "phone": f"555-{rng.randint(0, 9999):04d}",
    }
    text = rng.choice(TEMPLATES).format(**card)
    return {
        "messages": [
            {"role": "user", "content": f"{INSTRUCTION}\n\n{text}"},
            {"role": "assistant", "content": json.dumps(card)},
        ]
    }


OUT = Path(__file__).resolve().parent.parent / "data" / "quickstart"


def main(out: Path = OUT, seed: int = 3) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 600), ("eval", 60)):
        rows = [sample(rng) for _ in range(n)]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if name == "train":  # the same requests without their answers: distillation's data
            prompts = [{"messages": r["messages"][:1]} for r in rows]
            (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    print(f"wrote {out}/train.jsonl (600), prompts.jsonl (600, no answers) and eval.jsonl (60)")


if __name__ == "__main__":
    main()
