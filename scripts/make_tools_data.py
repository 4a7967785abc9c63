"""Generate the tool-calling example: requests -> one call of one of two functions, or a plain
reply when no tool fits, in OpenAI's tool format (rendered in FunctionGemma's format).

    user:      "What's the weather like in Lisbon? In fahrenheit please."
    assistant: tool_calls [get_weather(city="Lisbon", unit="fahrenheit")]

The base Gemma 3 270M has never seen FunctionGemma's format: it does not answer with a call.
Scored with `gemma3-tune eval --metric exact` on the call's text (held out: new phrasings of
the same functions). Deterministic: `python scripts/make_tools_data.py` rewrites
data/tools/ identically.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_timer",
            "description": "Start a countdown timer.",
            "parameters": {
                "type": "object",
                "properties": {"minutes": {"type": "integer"}, "label": {"type": "string"}},
                "required": ["minutes"],
            },
        },
    },
]
CITIES = (
    "Denver Austin Boston Chicago Seattle Portland Miami Atlanta Dallas Phoenix Oslo Lisbon Madrid "
    "Berlin Vienna Prague Dublin Lyon Milan Zurich Tokyo Osaka Seoul Lima Quito Nairobi Accra Cairo"
).split()
LABELS = "pasta tea eggs laundry bread rice pizza workout nap meeting".split()
WEATHER = [
    "What's the weather in {city}?",
    "Is it raining in {city} right now?",
    "How warm is it in {city} today?",
    "Weather for {city}, please.",
    "Tell me the current weather in {city}.",
    "Should I bring a jacket in {city}?",
]
WEATHER_UNIT = [
    "What's the weather like in {city}? In {unit} please.",
    "Temperature in {city} in {unit}?",
    "Give me {city}'s weather in {unit}.",
]
TIMER = [
    "Set a timer for {minutes} minutes.",
    "Remind me in {minutes} minutes.",
    "Start a {minutes} minute countdown.",
    "Timer: {minutes} min.",
]
TIMER_LABEL = [
    "Set a {minutes} minute timer for the {label}.",
    "{label} timer, {minutes} minutes please.",
    "Start a timer called {label} for {minutes} minutes.",
]
CHAT = [
    ("Thanks!", "You're welcome."),
    ("Hello there.", "Hello! How can I help?"),
    ("Who are you?", "I am an assistant that can check the weather and set timers."),
]
SYSTEM = "You are a model that can do function calling with the following functions"


def sample(rng: random.Random, held_out: bool) -> dict:
    """One conversation; held-out phrasings are the last template of each list."""

    def pick(templates: list[str]) -> str:
        return templates[-1] if held_out else rng.choice(templates[:-1])

    kind = rng.random()
    if kind < 0.1:
        q, a = rng.choice(CHAT)
        reply: dict = {"role": "assistant", "content": a}
    elif kind < 0.55:
        city = rng.choice(CITIES)
        if rng.random() < 0.5:
            unit = rng.choice(["celsius", "fahrenheit"])
            q, args = pick(WEATHER_UNIT).format(city=city, unit=unit), {"city": city, "unit": unit}
        else:
            q, args = pick(WEATHER).format(city=city), {"city": city}
        reply = _call("get_weather", args)
    else:
        minutes = rng.randint(1, 90)
        if rng.random() < 0.5:
            label = rng.choice(LABELS)
            q, args = pick(TIMER_LABEL).format(minutes=minutes, label=label), {"minutes": minutes, "label": label}  # fmt: skip
        else:
            q, args = pick(TIMER).format(minutes=minutes), {"minutes": minutes}
        reply = _call("set_timer", args)
    return {
        "tools": TOOLS,
        "messages": [
            {"role": "developer", "content": SYSTEM},
            {"role": "user", "content": q},
            reply,
        ],
    }


def _call(name: str, args: dict) -> dict:
    fn = {"name": name, "arguments": json.dumps(args)}
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": fn}],
    }


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "data" / "tools"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for name, n, held in (("train.jsonl", 400, False), ("eval.jsonl", 40, True)):
        rows = [sample(rng, held) for _ in range(n)]
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
