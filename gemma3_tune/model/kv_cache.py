"""The KV cache for generation: keys and values per layer, and the positions, documents and
image blocks of the cached tokens per layer type (what masks.py needs to mask new queries
against them). Attention appends to it (attention.py); `Gemma3.new_cache` makes an empty one;
generate.py decodes with it.

Shapes: B batch, S cached tokens, K kv heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .masks import TokenInfo


@dataclass
class KVCache:
    """Keys and values per layer for generation. Sliding layers keep only their window."""

    keys: list[Tensor | None] = field(default_factory=list)  # [B, K, S, Dh] per layer
    values: list[Tensor | None] = field(default_factory=list)
    info: dict[str, TokenInfo | None] = field(default_factory=dict)  # per layer type, [B, S]

    def length(self, layer_type: str) -> int:
        info = self.info.get(layer_type)
        return 0 if info is None else info.pos.shape[1]

    def repeat_interleave(self, n: int) -> KVCache:
        """Each batch row's cache n times in a row (`[B, ...]` -> `[B * n, ...]`): a prompt
        run once serves n samples decoded from it."""

        def rep(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.repeat_interleave(n, dim=0)

        info = {
            k: None if i is None else TokenInfo(rep(i.pos), rep(i.doc), rep(i.block))
            for k, i in self.info.items()
        }
        return KVCache([rep(k) for k in self.keys], [rep(v) for v in self.values], info)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
