"""Generate recipes/tiny-vision.yaml's data: solid-colour pictures, each asked "What colour is
this?" and answered with its colour's name (red, green, blue, yellow), 32 chats with one image
each. Deterministic: `python scripts/make_tiny_vision_data.py` rewrites data/tiny-vision/
identically (the files are also bundled, so the recipe runs as shipped).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220)}
COLOURS["yellow"] = (230, 220, 40)
OUT = Path(__file__).resolve().parent.parent / "data" / "tiny-vision"


def main(n: int = 32, seed: int = 0) -> None:
    rng = random.Random(seed)
    (OUT / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = rng.choice(sorted(COLOURS))
        rgb = np.clip(np.array(COLOURS[name]) + rng.randint(-20, 20), 0, 255)
        size = (24 + rng.randint(0, 20), 24 + rng.randint(0, 20))
        pixels = np.broadcast_to(rgb.astype(np.uint8), (*size, 3))
        Image.fromarray(np.ascontiguousarray(pixels)).save(OUT / "images" / f"{i:02d}.png")
        question = [
            {"type": "image", "image": f"images/{i:02d}.png"},
            {"type": "text", "text": "What colour is this?"},
        ]
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": name},
        ]
        lines.append(json.dumps({"messages": messages}))
    (OUT / "colours.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {n} chats and images to {OUT}")


if __name__ == "__main__":
    main()
