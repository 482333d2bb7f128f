"""`stoker demo` / `make demo`: generate default data, pack it, read it back and print a summary. No downloads."""

from __future__ import annotations

import os

from stoker.formats.pack import pack_dataset
from stoker.formats.verify import verify
from stoker.summary import inspect
from stoker.synthetic import make_image_tree, make_text_corpus


def _generate(workdir: str, per_class: int) -> tuple[str, str]:
    images, text = os.path.join(workdir, "raw", "images"), os.path.join(workdir, "raw", "text", "corpus.jsonl")
    marker = os.path.join(workdir, "raw", f".generated-{per_class}")
    if not os.path.exists(marker):
        print(f"generating {10 * per_class} JPEGs in 10 classes and 2,000 text documents under {workdir}/raw ...")
        make_image_tree(images, num_classes=10, per_class=per_class, min_side=160, max_side=500, seed=0)
        make_text_corpus(text, num_docs=2000, seed=0)
        open(marker, "w").close()
    return images, text


def _train_images(shards: str) -> None:
    """One epoch of the image pipeline: stream shards, decode + random-resized-crop in 2 workers, watch for starvation."""
    import torch

    import stoker
    from stoker.perf.monitor_report import format_report

    transform = stoker.build_transform(stoker.TransformSpec(size=128, mode="train"), backend="auto", seed=0)
    if transform.backend != "pil":
        why = f"a CUDA GPU and {transform.backend} are available"
    elif torch.cuda.is_available():
        why = "a CUDA GPU, but neither DALI nor Kornia installed (pip install 'stoker[gpu]')"
    else:
        why = "no CUDA GPU, so Pillow on the CPU"
    print(f"decode backend: {transform.backend} (picked by backend='auto': {why})")
    loader = stoker.DataLoader(stoker.StreamingDataset(shards, seed=0), batch_size=64, num_workers=2, collate_fn=transform)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    images = 0
    with stoker.monitor(loader, log=lambda line: None) as watched:
        for batch in watched:
            logits = model(batch["image"].cpu().float().div_(255))  # a GPU backend hands out CUDA tensors
            torch.nn.functional.cross_entropy(logits, batch["label"].cpu()).backward()
            images += len(batch["label"])
        report = watched.report(log=False)
    print(f"trained one epoch on {images:,} decoded 128x128 images, batches of 64 from 2 worker processes")
    print(format_report(report))


def _batch_text(shards: str) -> None:
    """Token-budget batches of the text shards, padded to multiples of 8; report the padding paid."""
    import stoker
    from stoker.formats.manifest import Manifest

    lengths = Manifest.load(shards).lengths
    sampler = stoker.TokenBudgetBatchSampler(lengths, max_tokens=8192, seed=0)
    loader = stoker.DataLoader(stoker.ShardDataset(shards), batch_sampler=sampler, collate_fn=stoker.pad_collate())
    shapes = [tuple(batch["input_ids"].shape) for batch in loader]
    stats = sampler.padding_stats()
    print(f"{len(shapes)} token-budget batches (<= 8192 tokens each, lengths padded to multiples of 8); "
          f"first shapes {shapes[:3]}; padding {100 * stats.padding_fraction:.1f}% of tokens")


def run_demo(workdir: str, *, per_class: int = 150) -> None:
    """Generate, pack (Arrow images, msgpack text), verify, then train on the images and batch the text."""
    images, text = _generate(workdir, per_class)
    for src, dst, fmt in ((images, "images-arrow", "arrow"), (text, "text-msgpack", "msgpack")):
        out = os.path.join(workdir, "shards", dst)
        result = pack_dataset(src, out, format=fmt, shard_size=16 << 20, overwrite=True, progress=False)
        print(f"\n== {dst}: packed {result.samples:,} samples in {result.seconds:.2f} s ({result.samples / max(result.seconds, 1e-9):,.0f}/s)")
        problems = verify(out)
        print(f"verify: {'all shards intact' if not problems else problems}")
        print("\n".join(inspect(out)))
        (_train_images if fmt == "arrow" else _batch_text)(out)
