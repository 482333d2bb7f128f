"""Padding, packing and throughput of stoker.bucketing on a real length distribution, offline.

Documents: every .py file of this interpreter's standard library, byte-level tokenized (token
ids = UTF-8 bytes) and capped at 2048 tokens; empty files are skipped. All batches share one
token budget (rows x padded length <= MAX_TOKENS). Run: `.venv/bin/python benchmarks/padding.py`.
"""

from __future__ import annotations

import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from stoker.bucketing.collate import pack_collate, pad_collate
from stoker.bucketing.metrics import length_histogram, padding_stats, render_histogram
from stoker.bucketing.samplers import BucketBatchSampler, TokenBudgetBatchSampler

MAX_TOKENS = 16384
CAP = 2048
PAD_MULTIPLE = 8
SEED = 0


def stdlib_documents() -> list[np.ndarray]:
    """Byte tokens of every non-empty stdlib .py file (site-packages excluded), capped at CAP."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts))
    docs = [np.frombuffer(p.read_bytes()[:CAP], dtype=np.uint8).astype(np.uint16) for p in paths]
    return [d for d in docs if len(d)]


def random_budget_batches(lengths: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Baseline: samples in random order, each batch filled greedily under the same budget (no sorting)."""
    order = rng.permutation(len(lengths))
    offsets, longest, count = [0], 0, 0
    for i, length in enumerate(lengths[order].tolist()):
        padded = -(-max(longest, length) // PAD_MULTIPLE) * PAD_MULTIPLE
        if count and (count + 1) * padded > MAX_TOKENS:
            offsets.append(i)
            longest, count = 0, 0
        longest, count = max(longest, length), count + 1
    offsets.append(len(order))
    return lengths[order], np.asarray(offsets)


def packing(docs: list[np.ndarray], rng: np.random.Generator, rows_per_batch: int, mode: str) -> tuple[float, float]:
    """(efficiency, real tokens/s) of pack_collate over random batches of <= rows_per_batch x CAP tokens."""
    collate = pack_collate(CAP, mode=mode, eos_id=0 if mode == "blocks" else None)
    batch: list[np.ndarray] = []
    tokens = 0
    for i in rng.permutation(len(docs)).tolist():
        if batch and tokens + len(docs[i]) > rows_per_batch * CAP:
            collate(batch)
            batch, tokens = [], 0
        batch.append(docs[i])
        tokens += len(docs[i])
    collate(batch)
    return collate.stats.efficiency, collate.stats.tokens_per_second()


def throughput(docs: list[np.ndarray], lengths: np.ndarray, seconds: float = 3.0) -> tuple[float, int]:
    """Real tokens/s of TokenBudgetBatchSampler + pad_collate, epochs repeated for `seconds`."""
    samples = [{"tokens": d, "length": len(d)} for d in docs]
    collate = pad_collate(pad_to_multiple_of=PAD_MULTIPLE)
    tokens, epoch = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        sampler = TokenBudgetBatchSampler(lengths, MAX_TOKENS, pad_to_multiple_of=PAD_MULTIPLE, seed=SEED)
        sampler.set_epoch(epoch)
        for batch in sampler:
            tokens += int(collate([samples[i] for i in batch])["lengths"].sum())
        epoch += 1
    return tokens / (time.perf_counter() - start), epoch


def build_time(n: int) -> tuple[float, float]:
    """Seconds to build one epoch's plan (construct + len) for n synthetic lengths, both samplers."""
    lengths = np.clip(np.random.default_rng(SEED).lognormal(5.5, 1.0, n), 1, CAP).astype(np.uint32)
    timings = []
    for make in (lambda: TokenBudgetBatchSampler(lengths, MAX_TOKENS), lambda: BucketBatchSampler(lengths, 32)):
        start = time.perf_counter()
        len(make())
        timings.append(time.perf_counter() - start)
    return timings[0], timings[1]


def main() -> None:
    torch.set_num_threads(1)
    docs = stdlib_documents()
    lengths = np.array([len(d) for d in docs], dtype=np.uint32)
    print(f"documents: {len(docs)} stdlib .py files, {int(lengths.sum())} byte tokens, capped at {CAP}")
    print("\n".join(render_histogram(length_histogram(lengths, bins=8), width=30)))

    bucketed = TokenBudgetBatchSampler(lengths, MAX_TOKENS, pad_to_multiple_of=PAD_MULTIPLE, seed=SEED).padding_stats()
    flat, offsets = random_budget_batches(lengths, np.random.default_rng(SEED))
    random = padding_stats(flat, offsets, PAD_MULTIPLE)
    packed = {
        (mode, rows): packing(docs, np.random.default_rng(SEED), rows, mode)
        for mode in ("documents", "blocks")
        for rows in (8, 64, 256)
    }
    rate, epochs = throughput(docs, lengths)
    token_s, bucket_s = build_time(10_000_000)

    print(f"max_tokens={MAX_TOKENS}, pad_to_multiple_of={PAD_MULTIPLE}")
    print(
        f"token-budget bucketing: {bucketed.batches} batches, "
        f"padding fraction {bucketed.padding_fraction:.2%} (goal <= 2%)"
    )
    print(f"random batching:        {random.batches} batches, padding fraction {random.padding_fraction:.2%}")
    print(f"padding ratio random / bucketed: {random.padding_fraction / max(bucketed.padding_fraction, 1e-12):.1f}x")
    for (mode, rows), (efficiency, pack_rate) in packed.items():
        print(
            f"pack_collate {mode:9s} seq_len={CAP}, batches of <= {rows:3d} rows of tokens: "
            f"efficiency {efficiency:.2%}, {pack_rate:,.0f} tokens/s"
        )
    best = packed[("documents", 256)][0]
    print(f"packing efficiency, documents mode at 256 rows per batch: {best:.2%} (goal >= 99%)")
    print(f"plan build for 10M lengths: TokenBudgetBatchSampler {token_s:.2f} s, BucketBatchSampler {bucket_s:.2f} s")
    print(f"sampler + pad_collate throughput, 1 thread: {rate:,.0f} tokens/s over {epochs} epochs (goal >= 1,000,000)")


if __name__ == "__main__":
    main()
