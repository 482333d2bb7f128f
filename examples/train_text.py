"""Train a tiny next-token model on packed text: length bucketing + pad_collate + stoker.monitor, on CPU.

    make demo                                   # writes demo-data/shards/text-msgpack
    .venv/bin/python examples/train_text.py demo-data/shards/text-msgpack --epochs 2

Batches come from a TokenBudgetBatchSampler over the lengths recorded in the manifest: samples of similar length
share a batch and every batch holds at most `--max-tokens` padded tokens, so little of each step is padding. The
model is a bigram predictor (embedding + linear), which keeps the step cheap enough for a CPU.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from torch import nn

import stoker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", default="demo-data/shards/text-msgpack")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16384, help="padded tokens per batch")
    parser.add_argument("--max-length", type=int, default=1024, help="longer samples are truncated to this")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    if args.max_tokens < args.max_length:
        parser.error("--max-tokens must be at least --max-length, or the longest samples fit no batch")
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the other cores belong to the loader workers

    dataset = stoker.ShardDataset(args.dataset)
    manifest = dataset.manifest
    # The sampler plans batches from the manifest's lengths alone: it must see them truncated as pad_collate will.
    lengths = np.minimum(manifest.lengths, args.max_length)
    sampler = stoker.TokenBudgetBatchSampler(lengths, max_tokens=args.max_tokens, pad_to_multiple_of=8, seed=0)
    collate = stoker.pad_collate(pad_id=0, pad_to_multiple_of=8, max_length=args.max_length)
    loader = stoker.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=args.workers)
    vocab = manifest.vocab_size or 256 + 1
    model = nn.Sequential(nn.Embedding(vocab, 32), nn.Linear(32, vocab))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    print(f"{len(dataset):,} documents, {int(lengths.sum()):,} tokens; planned padding "
          f"{sampler.padding_stats().padding_fraction:.1%}")

    with stoker.monitor(loader, log_every=20, log=print) as monitored:
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            real = padded = 0
            loss_sum = 0.0
            for batch in monitored:
                ids, mask = batch["input_ids"], batch["attention_mask"].bool()
                logits = model(ids[:, :-1])
                targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # never learn to predict padding
                loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                real += int(batch["lengths"].sum())
                padded += ids.numel()
                loss_sum += float(loss) * int(batch["lengths"].sum())
            print(f"epoch {epoch}: {real:,} tokens, loss {loss_sum / max(real, 1):.3f}, "
                  f"padding {1 - real / max(padded, 1):.1%} of batch tokens")


if __name__ == "__main__":
    main()
