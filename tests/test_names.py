"""One rule for names from outside: sample keys (nested), shard names and cache keys (plain) are accepted or refused
alike by every place that joins them under a folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from stoker import cache
from stoker.errors import ManifestError, SourceError, StorageError
from stoker.formats.manifest import ShardInfo
from stoker.formats.sources.files import check_key
from stoker.names import unsafe_name

# name, accepted as a plain name (shard, cache key), accepted as a nested name (sample key)
TABLE = [
    ("shard-00000.arrow", True, True),
    ("img 12 (copy).jpg", True, True),
    ("n01440764", True, True),
    ("caf\u00e9.jpg", True, True),
    ("cls/a.jpg", False, True),
    ("cls/sub/a.jpg", False, True),
    ("corpus.jsonl:17", True, True),
    ("books/part-1.parquet:0", False, True),
    ("", False, False),
    (".", False, False),
    ("..", False, False),
    ("../outside.arrow", False, False),
    ("cls/../../etc/passwd", False, False),
    ("cls/./a.jpg", False, False),
    ("/etc/passwd", False, False),
    ("cls//a.jpg", False, False),
    ("cls/", False, False),
    (".locks", False, False),
    ("cls/.hidden.jpg", False, False),
    ("a\0b", False, False),
    ("back\\slash.jpg", False, False),
    ("..\\..\\x", False, False),
    ("s3:x", False, False),
    ("C:x.jpg", False, False),
    ("a::file:///etc/passwd", False, False),
    ("a:1:2", False, False),
    ("x.jsonl:1/a.jpg", False, False),
]


@pytest.mark.parametrize("name, plain, nested", TABLE)
def test_one_rule_for_every_name_from_outside(tmp_path: Path, name: str, plain: bool, nested: bool) -> None:
    assert (unsafe_name(name) is None) is plain
    assert (unsafe_name(name, nested=True) is None) is nested
    store = cache.ShardCache(str(tmp_path / "c"), 1 << 20)
    if plain:
        assert ShardInfo.from_json({"name": name, "rows": 1, "bytes": 1, "sha256": "0" * 64}).name == name
        assert store.path(name) == str(tmp_path / "c" / name)
    else:
        with pytest.raises(ManifestError, match="not a plain file name"):
            ShardInfo.from_json({"name": name, "rows": 1, "bytes": 1, "sha256": "0" * 64})
        with pytest.raises(StorageError, match="not a plain file name"):
            store.path(name)
    if nested:
        assert check_key(name) == name
    else:
        with pytest.raises(SourceError, match="unsafe sample key"):
            check_key(name)
