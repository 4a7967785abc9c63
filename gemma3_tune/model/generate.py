"""Decoding with the KV cache: plain functions, gpt-fast style.

`prefill` runs the prompt (images included) once and fills the cache; `decode_one_token` feeds
one token at a time. Sliding layers keep only their last `window - 1` keys, so the cache grows
only on the global layers (1 in 6).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .config import GLOBAL, SLIDING, Gemma3Config
from .gemma3 import Gemma3
from .kv_cache import KVCache


def _probs(logits: Tensor, temperature: float, top_p: float, top_k: int) -> Tensor:
    """The sampling distribution `[B, V]`: softmax at `temperature` over the `top_k` most
    likely ids (0: all) and the smallest set reaching `top_p`."""
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return probs


def sample(
    logits: Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None, top_k: int = 0
) -> Tensor:
    """logits `[B, V]` -> token ids `[B]`. temperature 0 is greedy; top_k 0 keeps every id."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = _probs(logits, temperature, top_p, top_k)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def sample_rows(
    logits: Tensor, generators: Sequence[torch.Generator], temperature: float, top_p: float,
    top_k: int,
) -> Tensor:  # fmt: skip
    """One draw per row `[B]`, each from its own generator, by inverting the CDF: one uniform
    per row and one cumulative sum for the batch, where a multinomial per row costs ~5 ms
    over 262,144 ids (half of a decode step at batch 16 on a 2-core CPU). temperature 0:
    greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = _probs(logits, temperature, top_p, top_k)
    cdf = probs.cumsum(-1)  # [B, V]
    u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generators])
    ids = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return ids.clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def prefill(
    model: Gemma3, input_ids: Tensor, cache: KVCache, pixel_values: Tensor | None = None
) -> Tensor:
    """Run the prompt `[B, T]`; returns the last position's logits `[B, V]`."""
    return model(input_ids, pixel_values=pixel_values, cache=cache, last_logits_only=True).logits[
        :, -1
    ]


@torch.no_grad()
def decode_one_token(model: Gemma3, token: Tensor, cache: KVCache) -> Tensor:
    """token `[B]` -> next logits `[B, V]`."""
    return model(token[:, None], cache=cache).logits[:, -1]


@torch.no_grad()
def generate(
    model: Gemma3,
    input_ids: Tensor,  # [1, T] prompt
    *,
    max_new_tokens: int = 64,
    pixel_values: Tensor | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: set[int] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield new token ids one at a time, stopping at a stop id (not yielded) or the limit."""
    gen = torch.Generator(device=input_ids.device).manual_seed(seed) if seed is not None else None
    stop_ids = stop_ids or set()
    if not use_cache:  # reference path: recompute the whole sequence every step
        ids = input_ids
        for _ in range(max_new_tokens):
            logits = model(ids, pixel_values=pixel_values, last_logits_only=True).logits[:, -1]
            tok = sample(logits, temperature, top_p, gen)
            if int(tok[0]) in stop_ids:
                return
            yield int(tok[0])
            ids = torch.cat([ids, tok[:, None]], dim=1)
        return
    cache = model.new_cache()
    logits = prefill(model, input_ids, cache, pixel_values)
    for _ in range(max_new_tokens):
        tok = sample(logits, temperature, top_p, gen)
        if int(tok[0]) in stop_ids:
            return
        yield int(tok[0])
        logits = decode_one_token(model, tok, cache)


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Prompts left-padded to the longest `[B, T]`, and positions that start at 0 on each
    prompt's first token (each pad token is a document of its own, at position 0, so the
    masks keep it out of every real row)."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    pos = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, longest - len(p) :] = torch.tensor(p)
        pos[b, longest - len(p) :] = torch.arange(len(p))
    return ids, pos


@torch.no_grad()
def generate_batch(
    model: Gemma3,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 64,
    stop_ids: set[int] | None = None,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> list[list[int]]:
    """Replies for many prompts at once (left-padded): one weight read per step serves every
    row, which is what makes CPU evaluation of a 262k-vocabulary model fast. Greedy by
    default; with `temperature` > 0 it samples, from `generator`, or from one generator per
    row (then a row's reply does not depend on the prompts batched with it).

    Each padding token is a document of its own (position 0), so the masks keep it out of
    every real row; positions of each prompt start at 0.
    """
    stop_ids = stop_ids or set()
    device = next(model.parameters()).device
    ids, pos = _left_padded(prompts, pad_id)
    cache = model.new_cache()
    logits = model(
        ids.to(device), position_ids=pos.to(device), cache=cache, last_logits_only=True
    ).logits[:, -1]
    next_pos = torch.tensor([len(p) for p in prompts], device=device)
    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(max_new_tokens):
        tok = _next_tokens(logits, temperature, top_p, generator)  # [B]
        for b in range(len(prompts)):
            if not done[b]:
                if int(tok[b]) in stop_ids:
                    done[b] = True
                else:
                    out[b].append(int(tok[b]))
        if bool(done.all()):
            break
        step = model(
            tok[:, None], position_ids=next_pos[:, None], cache=cache, last_logits_only=True
        )
        logits = step.logits[:, -1]
        next_pos = next_pos + 1
    return out


def _next_tokens(
    logits: Tensor,  # [B, V]
    temperature: float,
    top_p: float,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    top_k: int = 0,
) -> Tensor:
    """The next token of every row `[B]`: one draw for the batch, or a draw per row from its
    own generator (the same draws `generate` makes for that prompt alone)."""
    if temperature <= 0 or generator is None or isinstance(generator, torch.Generator):
        return sample(logits, temperature, top_p, generator, top_k)
    if len(generator) != logits.shape[0]:
        raise ValueError(f"{len(generator)} generators for {logits.shape[0]} rows")
    rows = [
        sample(logits[b : b + 1], temperature, top_p, g, top_k) for b, g in enumerate(generator)
    ]
    return torch.cat(rows)


@torch.no_grad()
def generate_groups(
    model: Gemma3,
    prompts: list[list[int]],
    group: int,
    generators: Sequence[torch.Generator],
    *,
    max_new_tokens: int,
    stop_ids: set[int],
    pad_id: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    vision_features: Tensor | None = None,
    stop: Callable[[bool], bool] | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """`group` sampled completions of each prompt (prompt-major: b * group + k), each from its
    own generator, and whether each was cut at `max_new_tokens`. Each prompt (its images
    included: `vision_features` of the prompts' images in order) is run once; its KV cache is
    then repeated for its samples. A completion ends with the stop token it drew.
    `stop(all mine done) -> bool` decides when decoding ends (default: when all are done);
    processes whose weights are sharded (ZeRO-3) must run the same forwards, so they agree."""
    device = next(model.parameters()).device
    ids, pos = _left_padded(prompts, pad_id)
    cache = model.new_cache()
    extra = {} if vision_features is None else {"vision_features": vision_features}
    logits = model(
        ids.to(device), position_ids=pos.to(device), cache=cache, last_logits_only=True, **extra
    ).logits[:, -1]
    cache, logits = cache.repeat_interleave(group), logits.repeat_interleave(group, dim=0)
    next_pos = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(group)
    n = len(prompts) * group
    out: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    for _ in range(max_new_tokens):
        tok = sample_rows(logits, generators, temperature, top_p, top_k).tolist()
        for b in range(n):
            if not done[b]:
                out[b].append(tok[b])
                done[b] = tok[b] in stop_ids
        if stop(all(done)) if stop is not None else all(done):
            break
        step = model(
            torch.tensor(tok, device=device)[:, None],
            position_ids=next_pos[:, None],
            cache=cache,
            last_logits_only=True,
        )
        logits, next_pos = step.logits[:, -1], next_pos + 1
    return out, [not d for d in done]


def kv_cache_bytes(
    c: Gemma3Config, context: int, bytes_per_value: int = 2, all_global: bool = False
) -> int:
    """KV-cache size for one sequence of `context` tokens: K and V, every layer.

    Sliding layers hold at most `window` keys; with `all_global=True`, every layer holds all
    of them (the baseline the Gemma 3 report compares against).
    """
    per_token = 2 * c.num_key_value_heads * c.head_dim * bytes_per_value
    total = 0
    for t in c.layer_types:
        keep = context if (all_global or t == GLOBAL) else min(context, c.sliding_window)
        total += keep * per_token
    return total


__all__ = [
    "GLOBAL",
    "SLIDING",
    "decode_one_token",
    "generate",
    "generate_batch",
    "generate_groups",
    "kv_cache_bytes",
    "prefill",
    "sample",
]
