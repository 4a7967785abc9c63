"""Benchmark section `kv`: KV-cache bytes at 8K/32K/128K for 4B/27B, 5 local : 1 global vs all
global (a formula over the published configs, no measurement).

    python scripts/bench.py --sections kv --no-append
"""

from __future__ import annotations


def section_kv(args) -> str:
    from gemma3_tune.export.generate_cli import cache_table

    return (
        "Formula over the published configs (K and V, bf16, one sequence; sliding layers hold"
        " `sliding_window` positions), checked against a hand count in tests/test_generate.py.\n\n"
        + cache_table()
    )
