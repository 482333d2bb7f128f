"""pad_collate and pack_collate: exact contents, document boundaries, errors, DataLoader workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from stoker.bucketing.collate import best_fit_rows, pack_collate, pad_collate
from stoker.bucketing.samplers import TokenBudgetBatchSampler
from stoker.errors import ConfigError

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def make_docs(lengths, dtype=np.uint16):
    """Documents whose tokens are unique across the batch, so any mix-up shows."""
    docs, next_id = [], 1
    for n in lengths:
        tokens = np.arange(next_id, next_id + n, dtype=dtype)
        docs.append({"tokens": tokens, "length": int(n), "key": f"doc{len(docs)}"})
        next_id += n
    return docs


doc_lengths = st.lists(st.integers(0, 90), min_size=1, max_size=30).filter(any)


@SETTINGS
@given(
    st.lists(st.integers(1, 70), min_size=1, max_size=20), st.sampled_from([1, 8, 16]), st.sampled_from([None, 9, 40])
)
def test_pad_collate_rows_hold_each_sample_then_padding(lengths, multiple, max_length):
    docs = make_docs(lengths, np.uint32)
    out = pad_collate(pad_id=-1, pad_to_multiple_of=multiple, max_length=max_length)(docs)
    ids, mask, got_lengths = out["input_ids"], out["attention_mask"], out["lengths"]
    assert ids.dtype == mask.dtype == got_lengths.dtype == torch.int64
    kept = [min(n, max_length or n) for n in lengths]
    assert got_lengths.tolist() == kept
    width = ids.shape[1]
    assert width >= max(kept) and (width % multiple == 0 or width == max_length)
    for row, doc, n in zip(range(len(docs)), docs, kept):
        assert ids[row, :n].tolist() == doc["tokens"][:n].tolist()
        assert (ids[row, n:] == -1).all() and mask[row].sum() == n and mask[row, :n].all()


def test_pad_collate_accepts_bare_arrays_and_records_stats():
    collate = pad_collate()
    out = collate([np.array([5, 6, 7]), [1]])
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert (collate.stats.batches, collate.stats.real_tokens, collate.stats.total_tokens) == (1, 4, 16)
    assert collate.stats.padding_fraction == pytest.approx(0.75)
    assert collate.stats.tokens_per_second() > 0


@pytest.mark.parametrize("collate", [pad_collate(), pack_collate(16)], ids=["pad", "pack"])
def test_collates_check_stored_length_against_tokens(collate):
    docs = make_docs([3, 4])
    docs[1]["length"] = 5
    with pytest.raises(ConfigError, match=r"sample 1 of the batch \(key 'doc1'\): 'length' is 5 but it holds 4 tokens"):
        collate(docs)
    with pytest.raises(ConfigError, match="empty batch"):
        collate([])
    with pytest.raises(ConfigError, match="1-D integer"):
        collate([{"tokens": np.ones((2, 2), dtype=np.int64)}])


def test_pad_collate_rejects_empty_samples():
    with pytest.raises(ConfigError, match=r"sample 1 of the batch \(key 'doc1'\) has no tokens"):
        pad_collate()(make_docs([3, 0]))


def check_documents_batch(out, pieces, seq_len):
    """Invariants of a documents-mode batch; `pieces` are the expected token runs."""
    ids, labels = out["input_ids"].numpy(), out["labels"].numpy()
    mask, pos, cu = out["attention_mask"].numpy(), out["position_ids"].numpy(), out["cu_seqlens"].numpy()
    rows = ids.shape[0]
    assert ids.shape == labels.shape == mask.shape == pos.shape == (rows, seq_len)
    assert cu.dtype == np.int32 and cu[0] == 0 and cu[-1] == rows * seq_len and (np.diff(cu) > 0).all()
    assert out["max_seqlen"] == int(np.diff(cu).max())
    assert set(range(0, rows * seq_len, seq_len)) <= set(cu.tolist()), "no segment crosses a row"
    flat_ids, flat_mask, flat_pos, flat_labels = ids.ravel(), mask.ravel(), pos.ravel(), labels.ravel()
    segments = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert flat_pos[start:end].tolist() == list(range(end - start)), "positions restart at each boundary"
        seg_mask = flat_mask[start:end]
        assert seg_mask.all() or not seg_mask.any(), "a segment is all tokens or all padding"
        if seg_mask.all():
            segments.append(tuple(flat_ids[start:end].tolist()))
            assert flat_labels[start : end - 1].tolist() == flat_ids[start + 1 : end].tolist()
        assert flat_labels[end - 1] == -100, "no label crosses a document boundary"
        if not seg_mask.any():
            assert (flat_labels[start:end] == -100).all()
    for row in mask:  # padding only at the end of a row
        assert row.tolist() == sorted(row.tolist(), reverse=True)
    assert sorted(segments) == sorted(tuple(p) for p in pieces)


@SETTINGS
@given(doc_lengths, st.sampled_from([8, 32, 64]))
def test_pack_documents_keeps_documents_apart(lengths, seq_len):
    docs = make_docs(lengths)
    collate = pack_collate(seq_len, pad_id=0)
    out = collate(docs)
    pieces = [d["tokens"][i : i + seq_len].tolist() for d in docs for i in range(0, len(d["tokens"]), seq_len)]
    check_documents_batch(out, pieces, seq_len)
    total = sum(lengths)
    assert out["input_ids"].shape[0] >= -(-total // seq_len)
    assert collate.stats.real_tokens == total == int(out["attention_mask"].sum())


@SETTINGS
@given(doc_lengths, st.sampled_from([8, 32]))
def test_pack_documents_truncate_and_eos(lengths, seq_len):
    docs = make_docs(lengths)
    out = pack_collate(seq_len, overflow="truncate", eos_id=60000)(docs)
    pieces = [(d["tokens"].tolist() + [60000])[:seq_len] for d in docs if len(d["tokens"])]
    check_documents_batch(out, pieces, seq_len)


@SETTINGS
@given(doc_lengths, st.sampled_from([4, 16, 50]))
def test_pack_blocks_is_the_eos_joined_stream(lengths, seq_len):
    docs = make_docs(lengths)
    out = pack_collate(seq_len, mode="blocks", eos_id=0, pad_id=7)(docs)
    stream = np.concatenate([np.append(d["tokens"], 0) for d in docs if len(d["tokens"])]).astype(np.int64)
    ids, labels, mask = (out[k].numpy().ravel() for k in ("input_ids", "labels", "attention_mask"))
    n, rows = len(stream), max(1, -(-(len(stream) - 1) // seq_len))
    assert out["input_ids"].shape == (rows, seq_len)
    # Windows of seq_len + 1 overlapping by one: every token is an input, a label, or both.
    inputs = min(n, rows * seq_len)
    assert ids[mask == 1].tolist() == stream[:inputs].tolist() and mask[:inputs].all() and not mask[inputs:].any()
    assert (ids[inputs:] == 7).all()
    assert labels[: n - 1].tolist() == stream[1:].tolist() and (labels[n - 1 :] == -100).all()


def test_pack_documents_positions_and_boundaries_by_hand():
    out = pack_collate(8)([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15]])
    # pieces: [4..11] (8), [1,2,3], [12,13], [14,15] -> best fit: row0 = 8, row1 = 3 + 2 + 2
    assert out["input_ids"].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11], [1, 2, 3, 12, 13, 14, 15, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 0, 1, 0, 1, 0]]
    assert out["cu_seqlens"].tolist() == [0, 8, 11, 13, 15, 16]
    assert out["labels"].tolist() == [[5, 6, 7, 8, 9, 10, 11, -100], [2, 3, -100, 13, -100, 15, -100, -100]]


def test_best_fit_fills_tightest_row_first():
    row, offset, used = best_fit_rows(np.array([6, 5, 4, 3, 2]), 10)
    assert used.tolist() == [10, 10]
    assert row.tolist() == [0, 1, 0, 1, 1] and offset.tolist() == [0, 0, 6, 5, 8]


def test_pack_collate_bad_options_and_empty_documents():
    with pytest.raises(ConfigError, match="eos_id"):
        pack_collate(16, mode="blocks")
    with pytest.raises(ConfigError, match="mode"):
        pack_collate(16, mode="rows")
    with pytest.raises(ConfigError, match="overflow"):
        pack_collate(16, overflow="wrap")
    with pytest.raises(ConfigError, match="overflow applies"):
        pack_collate(16, mode="blocks", eos_id=0, overflow="split")
    with pytest.raises(ConfigError, match="seq_len"):
        pack_collate(0)
    with pytest.raises(ConfigError, match="all 2 documents of the batch are empty"):
        pack_collate(16)([[], np.array([], dtype=np.uint16)])
    out = pack_collate(16)([[], [1, 2]])  # empty documents are skipped
    assert out["cu_seqlens"].tolist() == [0, 2, 16]


class InMemoryText(torch.utils.data.Dataset):
    """A small map-style dataset returning samples as ShardDataset does."""

    def __init__(self, lengths):
        self.samples = make_docs(lengths)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return {**self.samples[i], "index": i}


def test_dataloader_with_workers_batch_sampler_and_pad_collate():
    lengths = np.random.default_rng(3).integers(1, 120, 200)
    dataset = InMemoryText(lengths)
    sampler = TokenBudgetBatchSampler(lengths, 512, seed=1)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=pad_collate(), num_workers=2)
    expected = list(sampler)
    batches = list(loader)
    assert len(batches) == len(expected) == len(loader)
    for batch, indices in zip(batches, expected):
        assert batch["input_ids"].numel() <= 512
        assert batch["lengths"].tolist() == lengths[indices].tolist()
        first = dataset.samples[indices[0]]["tokens"]
        assert batch["input_ids"][0, : len(first)].tolist() == first.tolist()
    assert sum(int(b["lengths"].sum()) for b in batches) == int(lengths.sum())
