"""Synthetic chat data at scale, for the data-preparation benchmark (not committed: make it).

    python scripts/make_synthetic_chats.py 1000000 /tmp/chats-1m.jsonl [--seed 0]

One `{"messages": [...]}` per line: an optional system prompt, then 1-3 user/assistant
exchanges whose word counts are log-normal (median about 250 Gemma tokens per conversation,
a long tail to several thousand), like public SFT mixes. Fixed seed: the same file every time.
"""

from __future__ import annotations

import argparse
import json
import random

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "model data train answer question value result function return list number string python "
    "explain why because first second then finally example code error file line output input "
    "Gemma token image city order price name date time weather recipe travel history science"
).split()


def sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(max(1, n_words))]
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice([".", "?", "!", "."])


def conversation(rng: random.Random) -> dict:
    total = min(6000, int(rng.lognormvariate(5.1, 0.8)))  # words over the whole chat
    turns = rng.choice([1, 1, 1, 2, 2, 3])
    msgs = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": sentence(rng, rng.randint(5, 20))})
    for _ in range(turns):
        q = max(3, total // (turns * 4))
        a = max(3, total // turns - q)
        msgs.append({"role": "user", "content": sentence(rng, q)})
        msgs.append({"role": "assistant", "content": sentence(rng, a)})
    return {"messages": msgs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("n", type=int)
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    with open(args.out, "w") as f:
        for _ in range(args.n):
            f.write(json.dumps(conversation(rng)) + "\n")


if __name__ == "__main__":
    main()
