"""Which client reads remote shards (obstore where it can take the URL and options, fsspec otherwise), and that
both read the same bytes, report missing objects and short reads, and survive forked workers."""

from __future__ import annotations

import os

import numpy as np
import pytest

from stoker.synthetic import make_dataset
from stoker import DataLoader, StreamingDataset
from stoker.dataloader import ReadOptions
from stoker.dataloader.remote import range_client

pytestmark = pytest.mark.remote

TIMEOUTS = {"connect_timeout": 2.0, "read_timeout": 5.0, "pool": 4}
S3 = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}


@pytest.mark.parametrize(("url", "options", "client"), [
    ("s3://bucket/ds", S3, "obstore"),
    ("s3://bucket/ds", {**S3, "config_kwargs": {"connect_timeout": 3, "s3": {"addressing_style": "path"}}}, "obstore"),
    ("s3://bucket/ds", {"anon": True, "client_kwargs": {"region_name": "eu-west-1"}}, "obstore"),
    ("s3://bucket/ds", {**S3, "profile": "dev"}, "fsspec"),  # botocore's profiles: s3fs reads them
    ("s3://bucket/ds", {**S3, "requester_pays": True}, "fsspec"),  # an option obstore is not given: fsspec
    ("s3://bucket/ds", {**S3, "use_ssl": False}, "fsspec"),
    ("s3://bucket/ds", {**S3, "client_kwargs": {**S3["client_kwargs"], "verify": "/etc/ca.pem"}}, "fsspec"),
    ("s3://bucket/ds", {**S3, "config_kwargs": {"s3": {"use_accelerate_endpoint": True}}}, "fsspec"),
    ("s3://bucket/ds", {"key": "k", "secret": "s"}, "fsspec"),  # no region, no endpoint: s3fs asks the bucket
    ("http://127.0.0.1:9/ds", None, "obstore"),
    ("http://user:pw@127.0.0.1:9/ds", None, "fsspec"),
    ("http://127.0.0.1:9/ds?sig=1", None, "fsspec"),
    ("http://127.0.0.1:9/ds", {"headers": {"Authorization": "x"}}, "fsspec"),
    ("memory://bucket/ds", None, "fsspec"),
])
def test_the_client_is_obstore_only_where_it_understands_every_option(url, options, client, monkeypatch):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    assert range_client(url, options, **TIMEOUTS).name == client


def test_aws_environment_variables_are_used_without_storage_options(tmp_path, object_store, monkeypatch):
    (tmp_path / "blob").write_bytes(b"0123456789")
    store = object_store(tmp_path, latency=0.001)
    for name in ("AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", store.endpoint_url)
    client = range_client(store.url("s3"), None, **TIMEOUTS)
    assert client.name == "obstore"
    assert bytes(client.read("blob", 2, 7)) == b"23456"


@pytest.mark.parametrize("forced", [None, "fsspec"])
def test_both_clients_read_ranges_and_report_missing_objects_and_short_reads(tmp_path, object_store, forced):
    blob = np.random.default_rng(1).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    (tmp_path / "blob").write_bytes(blob)
    store = object_store(tmp_path, latency=0.001)
    options = store.storage_options(**({"use_listings_cache": False} if forced else {}))  # an option only s3fs takes
    client = range_client(store.url("s3"), options, **TIMEOUTS)
    assert client.name == (forced or "obstore")
    assert bytes(client.read("blob", 10, 60_000)) == blob[10:60_000]
    with pytest.raises(FileNotFoundError):
        client.read("missing", 0, 10)
    with pytest.raises(EOFError, match="blob: asked for bytes 99990-100010, got 10"):
        client.read("blob", 99_990, 100_010)


@pytest.mark.parametrize("parent_use", ["stoker", "obstore"])
def test_workers_forked_after_the_parent_used_obstore_still_deliver(tmp_path, object_store, parent_use):
    # obstore's runtime threads do not survive a fork: a worker forked from a process that used it (through stoker
    # or directly) must read through fsspec instead, or its first read would hang.
    local = make_dataset(tmp_path / "src" / "ds", rows=(20, 20, 20), payload=(100, 1000))
    store = object_store(os.path.dirname(local), latency=0.002)
    kwargs = dict(storage_options=store.storage_options(), cache_dir=str(tmp_path / "cache"), shuffle=False,
                  read=ReadOptions(attempts=1, read_timeout=5, shard_timeout=20))
    in_parent = [f"{i:06d}" for i in range(60)]
    if parent_use == "stoker":
        assert [s["key"] for s in StreamingDataset(store.url("s3", "ds"), **kwargs)] == in_parent
    else:
        import obstore
        from obstore.store import HTTPStore

        plain = HTTPStore.from_url(store.url("http"), client_options={"allow_http": "true"})
        assert bytes(obstore.get_range(plain, "ds/manifest.json", start=0, end=1)) == b"{"
    kwargs["cache_dir"] = str(tmp_path / "cache2")  # downloaded again, by the workers this time
    loader = DataLoader(StreamingDataset(store.url("s3", "ds"), **kwargs), batch_size=7, num_workers=2,
                        multiprocessing_context="fork", timeout=60)
    assert [k for batch in loader for k in batch["key"]] == in_parent
