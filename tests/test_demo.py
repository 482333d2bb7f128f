"""`stoker demo` end to end on a small generated dataset: pack, verify, train one epoch, batch the text."""

from __future__ import annotations

from pathlib import Path

import pytest

from stoker.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", "--workdir", str(tmp_path), "--per-class", "4"]) == 0
    out = capsys.readouterr().out
    assert "verify: all shards intact" in out
    assert "decode backend: pil (picked by backend='auto'" in out or "decode backend: dali" in out or \
        "decode backend: kornia" in out
    assert "trained one epoch on 40 decoded 128x128 images" in out
    assert "token-budget batches" in out and "padding" in out
    assert (tmp_path / "shards" / "images-arrow" / "manifest.json").exists()


def test_version(capsys: pytest.CaptureFixture) -> None:
    import stoker
    from stoker.cli import pack_main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"stoker {stoker.__version__}"
    with pytest.raises(SystemExit):
        pack_main(["--version"])
    assert stoker.__version__ in capsys.readouterr().out
