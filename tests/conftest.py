"""Shared fixtures: small generated raw data and packed datasets, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from stoker.formats.pack import pack_dataset
from stoker.synthetic import make_image_tree, make_text_corpus


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 8 natural-looking JPEGs of 64-160 px."""
    return make_image_tree(tmp_path_factory.mktemp("raw") / "images", num_classes=3, per_class=8, min_side=64, max_side=160, seed=1)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .jsonl file of 300 documents with long-tailed lengths."""
    return make_text_corpus(tmp_path_factory.mktemp("raw") / "text" / "corpus.jsonl", num_docs=300, seed=1)


@pytest.fixture(scope="session")
def large_jpegs(tmp_path_factory: pytest.TempPathFactory) -> str:
    """4 classes x 50 JPEGs of 300-500 px packed into Arrow shards of 1 MB: decoding and augmenting them is most of
    a loader's work. The raw tree is beside the shards, in `../raw`."""
    root = tmp_path_factory.mktemp("large-jpegs")
    make_image_tree(str(root / "raw"), num_classes=4, per_class=50, min_side=300, max_side=500, seed=0)
    pack_dataset(str(root / "raw"), str(root / "shards"), format="arrow", shard_size=1 << 20, progress=False)
    return str(root / "shards")


@pytest.fixture(scope="session", params=["arrow", "msgpack"])
def shard_format(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def packed_images(image_tree: Path, tmp_path_factory: pytest.TempPathFactory, shard_format: str) -> Path:
    """The image tree packed into several small shards."""
    dst = tmp_path_factory.mktemp(f"images-{shard_format}")
    pack_dataset(str(image_tree), str(dst), format=shard_format, shard_size=64 << 10, workers=1, progress=False)
    return dst


@pytest.fixture(scope="session")
def packed_text(text_corpus: Path, tmp_path_factory: pytest.TempPathFactory, shard_format: str) -> Path:
    """The text corpus packed with the byte tokenizer into several small shards."""
    dst = tmp_path_factory.mktemp(f"text-{shard_format}")
    pack_dataset(str(text_corpus), str(dst), format=shard_format, shard_size=32 << 10, workers=1, progress=False)
    return dst


@pytest.fixture
def object_store():
    """Start a loopback object store (nginx: `stoker.testing.ObjectStore`) over a directory:
    `object_store(directory, latency=0.02, rate=100e6)`; every store started is stopped at the end of the test."""
    from stoker.testing import INSTALL_HINT, ObjectStore, available

    if not available():
        pytest.skip(f"no nginx with the echo module: {INSTALL_HINT}")
    started: list[ObjectStore] = []

    def start(directory, **kwargs) -> ObjectStore:
        store = ObjectStore(directory, **kwargs).start()
        started.append(store)
        return store

    yield start
    for store in started:
        store.stop()
