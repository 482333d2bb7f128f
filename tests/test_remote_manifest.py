"""The manifest of a remote dataset is read through the shards' client (obstore) where it applies: in a child
process, so that the training process never starts obstore's runtime (its forked workers can still use obstore)
and never imports s3fs; with the same errors as through fsspec."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stoker.synthetic import make_dataset
from stoker import StreamingDataset
from stoker.dataloader import ReadOptions
from stoker.errors import ManifestError

pytestmark = [pytest.mark.remote, pytest.mark.timeout(120)]
READ = ReadOptions(attempts=1, read_timeout=5, shard_timeout=20)

# In a fresh interpreter: this test session has long imported s3fs and may have started obstore's runtime.
OPEN = r"""
import json, sys
import stoker
from stoker.dataloader import remote
url, options, cache = json.loads(sys.argv[1])
ds = stoker.StreamingDataset(url, storage_options=options, cache_dir=cache, shuffle=False)
after_open = {"s3fs": "s3fs" in sys.modules, "botocore": "botocore" in sys.modules,
              "runtime": remote._runtime_running()}
loader = stoker.DataLoader(ds, batch_size=7, num_workers=2, multiprocessing_context="fork", timeout=60)
keys = [k for batch in loader for k in batch["key"]]
print(json.dumps({**after_open, "keys": keys, "rows": len(ds)}))
"""


@pytest.fixture
def remote_dataset(tmp_path, object_store):
    local = make_dataset(tmp_path / "src" / "ds", rows=(20, 20, 20), payload=(100, 1000))
    return object_store(os.path.dirname(local), latency=0.002)


@pytest.mark.parametrize("protocol", ["s3", "http"])
def test_opening_a_remote_dataset_leaves_no_obstore_runtime_and_no_s3fs_behind(remote_dataset, tmp_path, protocol):
    store = remote_dataset
    options = store.storage_options() if protocol == "s3" else None
    done = subprocess.run([sys.executable, "-c", OPEN, json.dumps([store.url(protocol, "ds"), options,
                                                                   str(tmp_path / "cache")])],
                          capture_output=True, text=True, timeout=90, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["s3fs"], result["botocore"], result["runtime"]) == (False, False, False)
    assert result["rows"] == 60 and result["keys"] == [f"{i:06d}" for i in range(60)]


def test_manifest_errors_are_the_same_through_obstore(remote_dataset, tmp_path, monkeypatch):
    store = remote_dataset
    options = store.storage_options()
    with pytest.raises(ManifestError, match=r"s3://data/nothing-here/manifest\.json: no manifest"):
        StreamingDataset(store.url("s3", "nothing-here"), storage_options=options, read=READ)
    manifest = tmp_path / "src" / "ds" / "manifest.json"
    with monkeypatch.context() as env:
        env.setenv("STOKER_MAX_MANIFEST_BYTES", str(manifest.stat().st_size - 1))
        with pytest.raises(ManifestError, match=r"larger than the .*-byte limit on manifests"):
            StreamingDataset(store.url("s3", "ds"), storage_options=options, read=READ)
    # The manifest file named directly: its folder is the dataset's.
    ds = StreamingDataset(store.url("s3", "ds/manifest.json"), storage_options=options, read=READ, shuffle=False,
                          cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 60

