"""Train a tiny CNN on packed images: stoker.DataLoader + the batch augment transform + stoker.monitor, on CPU.

    make demo                                   # writes demo-data/shards/images-arrow
    .venv/bin/python examples/train_images.py demo-data/shards/images-arrow --epochs 2

Workers decode and augment whole batches (the transform is the collate_fn) and hand out uint8 tensors; the float
conversion and normalization happen in the training step, where a GPU would do them. The monitor reports how much
of each step waited for data. The demo images are random scenes whose class carries no signal, so expect chance
accuracy: the point here is the input pipeline, not the model.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import stoker

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


def tiny_cnn(num_classes: int) -> nn.Module:
    """A few thousand parameters: small enough that a CPU step takes milliseconds."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", default="demo-data/shards/images-arrow")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--size", type=int, default=64, help="crop side fed to the model")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the other cores belong to the loader workers; oversubscribing slows both

    dataset = stoker.StreamingDataset(args.dataset, shuffle=True, seed=0)
    transform = stoker.build_transform(stoker.TransformSpec(size=args.size, mode="train"), backend="pil", seed=0)
    loader = stoker.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=transform)
    model = tiny_cnn(len(dataset.manifest.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    with stoker.monitor(loader, log_every=20, log=print) as monitored:
        for epoch in range(args.epochs):
            transform.set_epoch(epoch)  # new crops and flips each epoch; workers copy the transform at iter()
            total, correct, loss_sum = 0, 0, 0.0
            for batch in monitored:
                images = (batch["image"].float() - MEAN) / STD
                logits = model(images)
                loss = nn.functional.cross_entropy(logits, batch["label"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += len(batch["label"])
                correct += int((logits.argmax(1) == batch["label"]).sum())
                loss_sum += float(loss) * len(batch["label"])
            print(f"epoch {epoch}: {total} images, loss {loss_sum / max(total, 1):.3f}, "
                  f"train accuracy {correct / max(total, 1):.1%}")


if __name__ == "__main__":
    main()
