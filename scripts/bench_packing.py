"""Benchmark section `packing`: real tokens / tokens computed, our packing vs naive padding vs
TRL's pack_dataset, on a synthetic mix of chat lengths.

    python scripts/bench.py --sections packing --packing-seq 2048,4096 --no-append
"""

from __future__ import annotations

import random

from bench_harness import chat_lengths


def section_packing(args) -> str:
    import datasets
    from trl.data_utils import pack_dataset

    from gemma3_tune.data.packing import pack

    lengths = chat_lengths(args.packing_samples)
    rows = [
        "| max_seq_len | method | rows (batches for micro-batch 8) | tokens computed | real tokens"
        " kept | efficiency | tokens cut |",
        "|---|---|---|---|---|---|---|",
    ]
    total = sum(lengths)
    for cap in args.packing_seq:
        fits = [n for n in lengths if n <= cap]
        long_ = [n for n in lengths if n > cap]
        # Ours: samples that fit are packed whole; longer ones are truncated (data.truncation:
        # drop would count and skip them), so each is one more cut sample.
        ours_rows = pack(fits + [cap] * len(long_), cap, seed=0)
        kept = sum(fits) + cap * len(long_)
        results = {"gemma3-tune (BFD, whole samples)": (len(ours_rows), len(ours_rows) * cap, kept)}
        # Naive: one sample per row, padded to max_seq_len (padding="max_length").
        results["naive, pad to max_seq_len"] = (len(lengths), len(lengths) * cap, kept)
        # Naive: micro-batch 8 in random order, padded to the longest in the batch.
        rng = random.Random(0)
        order = [min(n, cap) for n in lengths]
        rng.shuffle(order)
        batched = sum(8 * max(order[i : i + 8]) for i in range(0, len(order), 8))
        results["naive, micro-batch 8, pad to longest"] = (len(order) // 8, batched, kept)
        ds = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})
        for strategy in ("bfd", "wrapped"):
            packed = pack_dataset(ds, cap, strategy=strategy)
            lens = [len(x) for x in packed["input_ids"]]
            results[f"TRL pack_dataset({strategy!r})"] = (len(lens), len(lens) * cap, sum(lens))
        for name, (n_rows, computed, real) in results.items():
            cut = total - real
            rows.append(
                f"| {cap} | {name} | {n_rows:,} | {computed:,} | {real:,} |"
                f" {100 * real / computed:.1f}% | {cut:,} ({100 * cut / total:.1f}%) |"
            )
    head = (
        f"{len(lengths):,} chats, {total:,} tokens, lengths log-normal (median 350, mean"
        f" {total // len(lengths)}, max {max(lengths)}). Efficiency = real tokens / tokens"
        " computed, where a packed row costs max_seq_len tokens. 'tokens cut' are tokens lost"
        " to truncation: TRL's 'wrapped' cuts chats in the middle across rows (it loses nothing"
        " but splits conversations); TRL's 'bfd' truncates long chats and drops the rest."
    )
    return "\n".join([head, "", *rows])
