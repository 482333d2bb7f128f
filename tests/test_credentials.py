"""storage_options secrets never appear in logs, errors, reprs, state dicts or the manifest."""

from __future__ import annotations

import json
import logging
import traceback

import pytest
from stoker.synthetic import make_dataset
from stoker.testing import S3Server, free_port

from stoker import DataLoader, StreamingDataset
from stoker.dataloader import ReadOptions
from stoker.errors import StokerError
from stoker.formats.manifest import Manifest
from stoker.storage import redact

SECRET = "sEcReT-9f8e7d6c5b4a"
TOKEN = "sEsSiOn-0a1b2c3d4e5f"
FAST = ReadOptions(prefetch_shards=1, attempts=2, backoff=0.01, connect_timeout=1, read_timeout=2, shard_timeout=10)


def _everything(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc.args)


def test_redact_removes_userinfo_and_secret_query_parameters():
    url = f"https://user:{SECRET}@host/ds?X-Amz-Signature={TOKEN}&sig=1&access_token={TOKEN}&part=3"
    clean = redact(url)
    assert SECRET not in clean and TOKEN not in clean and "part=3" in clean and clean.startswith("https://host/")


def _capture_logs(caplog) -> None:
    # stoker's loggers at DEBUG, every other library at INFO: botocore's and fsspec's own DEBUG logs print request
    # headers and URLs (session tokens included); keep those off in production (documented in docs/promises.md).
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="stoker")


def test_secrets_in_a_url_stay_out_of_errors(caplog):
    _capture_logs(caplog)
    url = f"http://user:{SECRET}@127.0.0.1:{free_port()}/ds?token={TOKEN}"
    with pytest.raises(StokerError) as info:
        StreamingDataset(url, read=FAST)
    text = _everything(info.value) + caplog.text
    assert SECRET not in text and TOKEN not in text


@pytest.mark.remote
@pytest.mark.timeout(90)
def test_secrets_in_storage_options_never_leak(tmp_path, caplog, image_tree):
    from stoker.formats.pack import pack_dataset

    _capture_logs(caplog)
    local = make_dataset(tmp_path / "src", rows=(10, 10))
    with S3Server() as s3:
        s3.create_bucket("data")
        s3.upload_dir(local, "s3://data/ds")
        options = s3.storage_options(secret=SECRET, token=TOKEN)
        ds = StreamingDataset("s3://data/ds", storage_options=options, cache_dir=str(tmp_path / "cache"), read=FAST)
        loader = DataLoader(ds, batch_size=4, num_workers=2)
        it = iter(loader)
        next(it)
        state = loader.state_dict()
        del it
        seen = repr(ds) + repr(loader) + json.dumps(state) + str(ds.__dict__.get("manifest"))

        # Packing to S3 with the same credentials: the manifest records options, never the credentials.
        pack_dataset(str(image_tree), "s3://data/packed", storage_options=options, workers=1, progress=False)
        manifest_text = s3.client().get_object(Bucket="data", Key="packed/manifest.json")["Body"].read().decode()
        Manifest.loads(manifest_text)

        # Errors: a missing dataset, a missing shard, then the endpoint gone.
        errors = []
        for url in ("s3://data/nothing-here", "s3://nobucket/ds"):
            with pytest.raises(StokerError) as info:
                StreamingDataset(url, storage_options=options, read=FAST)
            errors.append(info.value)
        s3.client().delete_object(Bucket="data", Key="ds/shard-00001.arrow")
        with pytest.raises(StokerError) as info:
            list(DataLoader(StreamingDataset("s3://data/ds", storage_options=options, shuffle=False,
                                             cache_dir=str(tmp_path / "c2"), read=FAST), batch_size=4, num_workers=2))
        errors.append(info.value)
        s3.kill()
        with pytest.raises(StokerError) as info:
            list(StreamingDataset("s3://data/ds", storage_options=options, cache_dir=str(tmp_path / "c3"), read=FAST))
        errors.append(info.value)
    text = seen + manifest_text + "".join(_everything(e) for e in errors) + caplog.text
    assert "StorageError" in text or "ManifestError" in text  # the errors really were rendered above
    assert SECRET not in text and TOKEN not in text
