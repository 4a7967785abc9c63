"""One rule for every progress bar (train's console, eval, teacher targets and answers, DPO
reference log-probs, data preparation): drawn only on a terminal. Redirected to a file, a tqdm
bar writes a `\r`-separated redraw per update into the log; the lines around it carry the same
information once."""

from __future__ import annotations

import sys

from tqdm import tqdm


def on_terminal(stream=None) -> bool:
    """Whether `stream` (stderr by default) is a terminal."""
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def bar(total: int, desc: str, unit: str = "it", enabled: bool = True, **kw) -> tqdm:
    """A tqdm bar on stderr, disabled (a no-op) unless `enabled` and stderr is a terminal."""
    off = not (enabled and on_terminal())
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=off, **kw)
