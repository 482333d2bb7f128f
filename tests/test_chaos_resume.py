"""The training process is SIGKILLed mid-epoch (with its workers) and resumed from its last saved state_dict.

A real child process "trains": after each batch it commits {state_dict, keys seen} atomically (a checkpoint).
The parent SIGKILLs its whole process group once a few checkpoints exist, starts it again, and checks that the
committed keys of the two runs together are the epoch, each sample exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from stoker.synthetic import make_dataset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
HERE = Path(__file__).resolve().parent

TRAIN = textwrap.dedent("""
    import json, os, sys, time
    import torch
    from stoker import DataLoader, StreamingDataset
    data, ckpt = sys.argv[1], sys.argv[2]
    loader = DataLoader(StreamingDataset(data, seed=7, shuffle_buffer=30), batch_size=8, num_workers=2)
    keys = []
    if os.path.exists(ckpt):
        saved = torch.load(ckpt)
        loader.load_state_dict(saved["state"])
        keys = saved["keys"]
        print("resumed at", saved["state"]["consumed"], flush=True)
    for batch in loader:
        keys += batch["key"]
        time.sleep(0.02)  # the "training step"
        torch.save({{"state": loader.state_dict(), "keys": keys}}, ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)  # commit: the state and what was trained on, together
    print("done", len(keys), flush=True)
""")


def test_training_process_sigkilled_and_resumed_delivers_each_sample_once(tmp_path):
    import torch

    data = make_dataset(tmp_path / "data", rows=(40,) * 5)
    ckpt = tmp_path / "ckpt.pt"
    cmd = [sys.executable, "-c", TRAIN.format(), data, str(ckpt)]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))

    first = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while True:  # wait for a few commits, then kill the trainer and its workers at once
            assert first.poll() is None, first.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            if ckpt.exists() and len(torch.load(ckpt)["keys"]) >= 48:
                break
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
    killed_at = torch.load(ckpt)
    assert 48 <= len(killed_at["keys"]) < 200  # killed mid-epoch

    second = subprocess.run(cmd, env=env, capture_output=True, timeout=90, check=False)
    assert second.returncode == 0, second.stderr.decode()[-2000:]
    assert b"resumed at" in second.stdout
    keys = torch.load(ckpt)["keys"]
    assert sorted(keys) == [f"{i:06d}" for i in range(200)]  # exactly once across the kill
    assert keys[:len(killed_at["keys"])] == killed_at["keys"]
