"""The README's "Train from shards" snippet runs as written (train, checkpoint mid-epoch, resume) on small shards."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stoker.formats.pack import pack_dataset
from stoker.synthetic import make_image_tree

REPO = Path(__file__).resolve().parents[1]


def snippet(title: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_train_from_shards_snippet_runs_as_written(tmp_path: Path) -> None:
    make_image_tree(str(tmp_path / "raw"), num_classes=4, per_class=40, min_side=160, max_side=300, seed=0)
    pack_dataset(str(tmp_path / "raw"), str(tmp_path / "shards" / "train"), shard_size=1 << 20, progress=False)
    code = snippet("Train from shards")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "decode backend: " in proc.stdout
    assert "stoker.monitor report" in proc.stderr + proc.stdout
    assert (tmp_path / "checkpoint.pt").exists()
