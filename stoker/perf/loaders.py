"""The loader `stoker bench` and `stoker bench --tune` measure: the one a user of these shards would build."""

from __future__ import annotations

from typing import Any

PREFETCH = 2  # batches each loader worker prepares ahead (torch's default)


def make_loader(source: str, *, image: bool, batch_size: int, workers: int, prefetch: int = PREFETCH,
                size: int = 224, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(loader, its description): stoker.DataLoader over a shuffled StreamingDataset; images through the Pillow
    transform at `size` px, text through BucketedStream and pad_collate."""
    from stoker.dataloader.stream import StreamingDataset

    try:
        from stoker.dataloader.loader import DataLoader

        name = "stoker.DataLoader"
    except ImportError:  # the stoker loader is optional here; torch's works with a StreamingDataset too
        from torch.utils.data import DataLoader

        name = "torch DataLoader over stoker.StreamingDataset"
    dataset = StreamingDataset(source, shuffle=True, seed=0, storage_options=storage_options)
    extra: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": prefetch} if workers else {}
    if image:
        from stoker.augment.registry import build_transform
        from stoker.augment.spec import TransformSpec

        transform = build_transform(TransformSpec(size=size), backend="pil", seed=0)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=transform, **extra)
    else:
        from stoker.bucketing.collate import pad_collate
        from stoker.bucketing.bucketed import BucketedStream

        stream = BucketedStream(dataset, batch_size=batch_size)
        loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=pad_collate(), **extra)
        name += " + BucketedStream + pad_collate"
    return loader, name


def count_items(batch: Any, image: bool) -> int:
    """Items in a batch of `make_loader`'s loader: images, or real (unpadded) tokens."""
    return len(batch["label"]) if image else int(batch["lengths"].sum())


# Where the work of each `stoker bench` stage happens in `make_loader`'s loader, by the names of the loader's own
# stage clocks (`DataLoader.stage_times()`): the image transform and pad_collate are the loader's collate_fn, so
# decode, augment and collate all run inside its "transform" stage.
_CLOCK_STAGE = {"read": "read", "decode": "transform", "augment": "transform", "collate": "transform",
                "h2d": "pin", "loader": "handoff"}


def clock_stage(bench_stage: str, remote: bool = False) -> str | None:
    """The stage of the loader's clock (as `stoker.monitor` names it) where bench stage `bench_stage` runs."""
    if bench_stage == "read" and remote:
        return "fetch"
    return _CLOCK_STAGE.get(bench_stage)
