"""examples/train_images.py under DistributedDataParallel: gloo on CPU, one process per rank.

    make demo
    .venv/bin/torchrun --nproc_per_node 2 examples/train_ddp.py demo-data/shards/images-arrow

StreamingDataset splits each epoch between the ranks by itself (it reads the rank and world size from the process
group), so there is no DistributedSampler. drop_last=True gives every rank the same number of batches: a rank
with one batch more would wait forever in its gradient all-reduce. stoker.monitor gathers every rank's data wait
and names the slowest rank. Started without torchrun, it runs as a world of one.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import stoker

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_images import MEAN, STD, tiny_cnn  # noqa: E402  (the same model and normalization)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", default="demo-data/shards/images-arrow")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--workers", type=int, default=1, help="loader workers per rank")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    if "RANK" in os.environ:  # started by torchrun, which also sets MASTER_ADDR/PORT and WORLD_SIZE
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    torch.set_num_threads(1)

    dataset = stoker.StreamingDataset(args.dataset, shuffle=True, seed=0)
    transform = stoker.build_transform(stoker.TransformSpec(size=args.size, mode="train"), backend="pil", seed=0)
    loader = stoker.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=transform,
                               drop_last=True)
    model = DistributedDataParallel(tiny_cnn(len(dataset.manifest.classes)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    log = print if rank == 0 else (lambda line: None)

    # Created after init_process_group, on every rank: its reports are collectives.
    with stoker.monitor(loader, log_every=20, log=log) as monitored:
        for epoch in range(args.epochs):
            transform.set_epoch(epoch)
            seen = torch.zeros(2)  # images, summed loss
            for batch in monitored:
                images = (batch["image"].float() - MEAN) / STD
                loss = nn.functional.cross_entropy(model(images), batch["label"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # DDP all-reduces the gradients here
                optimizer.step()
                seen += torch.tensor([len(batch["label"]), float(loss) * len(batch["label"])])
            dist.all_reduce(seen)
            log(f"epoch {epoch}: {int(seen[0])} images over {dist.get_world_size()} ranks, "
                f"loss {float(seen[1] / seen[0].clamp(min=1)):.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
