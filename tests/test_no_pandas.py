"""pyarrow imports pandas on the first `pa.array` / `Array.to_numpy` of a process when pandas is installed.

That cost 0.7 s in every pack worker and every loader worker, so stoker builds and reads its columns from
buffers. A stand-in `pandas` that records being imported checks it, whether or not pandas is installed here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from stoker.synthetic import make_image_tree

def test_pack_stream_and_load_never_import_pandas(tmp_path: Path) -> None:
    fake = tmp_path / "fake" / "pandas"
    fake.mkdir(parents=True)
    marker = tmp_path / "pandas-imported"
    # Raising ImportError makes pyarrow carry on as if pandas were absent.
    fake.joinpath("__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError('stand-in')\n")
    src = tmp_path / "src"
    make_image_tree(src, num_classes=2, per_class=12, min_side=40, max_side=60, seed=0)
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"document number {i} " * (i % 7 + 1) + "\n" for i in range(200)))
    script = f"""
import sys
sys.path.insert(0, {str(fake.parent)!r})
import stoker
images, texts = {str(tmp_path / "images")!r}, {str(tmp_path / "texts")!r}
stoker.pack_dataset({str(src)!r}, images, workers=2, shard_size=8 << 10, progress=False)
stoker.pack_dataset({str(text)!r}, texts, workers=2, shard_size=4 << 10, progress=False)
transform = stoker.build_transform(stoker.TransformSpec(size=32), backend="pil", seed=0)
loader = stoker.DataLoader(stoker.StreamingDataset(images, shuffle=True, seed=0), batch_size=8, num_workers=2,
                           collate_fn=transform)
assert sum(len(batch["label"]) for batch in loader) == 24
assert sum(1 for _ in stoker.StreamingDataset(texts)) == 200
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists(), "something made pyarrow import pandas"
