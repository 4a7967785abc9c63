"""Summarise a pytest log run with --durations=0 as markdown (tests/DURATIONS.md):
the wall time, the slowest tests and each module's total.

    python scripts/durations.py LOG [--top 25] [--title TEXT]
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

ROW = re.compile(r"^([\d.]+)s (call|setup|teardown)\s+(\S+.*)$")
END = re.compile(r"=+ (.*) in ([\d.]+)s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("log", type=Path)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--title", default="")
    args = p.parse_args()
    rows, summary = [], ""
    for line in args.log.read_text().splitlines():
        if m := ROW.match(line):
            rows.append((float(m[1]), m[2], m[3]))
        elif m := END.search(line):
            summary = f"{m[1]} in {float(m[2]):.0f} s"
    per_module = collections.Counter()
    for t, _, name in rows:
        per_module[name.split("::")[0]] += t
    print(f"### {args.title}\n\n{summary}\n")
    print("| seconds | phase | test |\n|---|---|---|")
    for t, phase, name in sorted(rows, reverse=True)[: args.top]:
        print(f"| {t:.1f} | {phase} | `{name}` |")
    print("\n| seconds | module |\n|---|---|")
    for name, t in per_module.most_common(args.top):
        print(f"| {t:.1f} | `{name}` |")


if __name__ == "__main__":
    main()
