"""Text inputs for packing: list .jsonl/.txt/.parquet files, cut them into spans, read documents, tokenize them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from stoker import storage
from stoker.errors import ConfigError, MissingExtraError, SourceError
from stoker.formats.sources.files import is_utf8, read_file, shown

TEXT_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")



@dataclass(frozen=True)
class TextSpan:
    """A contiguous run of documents in one text file: lines [start, stop) or Parquet rows [start, stop)."""

    path: str
    start: int
    stop: int
    byte_start: int
    byte_stop: int


def list_text_files(src: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """A text source is one file or a directory of .jsonl/.txt/.parquet files (sorted); local path or URL."""
    if not storage.is_local(src):
        return _list_remote_text(src, storage_options)
    if os.path.isfile(src):
        files = [src]
    elif os.path.isdir(src):
        files = sorted(
            os.path.join(dirpath, f)
            for dirpath, _, names in os.walk(src)
            for f in names
            if f.lower().endswith(TEXT_SUFFIXES) and not f.startswith(".")
        )
    else:
        raise SourceError(f"{src}: no such file or directory")
    if not files:
        raise SourceError(f"{src}: no .jsonl, .txt or .parquet files")
    return files


def text_name_problems(src: str, files: list[str]) -> tuple[list[str], list[dict[str, str]]]:
    """(files whose names can be sample keys, a `skipped` entry per file whose name is not valid UTF-8)."""
    bad = [f for f in files if not is_utf8(f)]
    problems = [{"path": shown(text_key(src, f)), "error": "file name is not valid UTF-8 (sample keys are text); rename it"}
                for f in bad]
    return [f for f in files if f not in bad], problems


def _list_remote_text(src: str, storage_options: dict[str, Any] | None) -> list[str]:
    from stoker.formats import listing

    fs, path = storage.filesystem(src, storage_options)
    if fs.isfile(path):
        return [src]
    prefixes, top = listing.list_prefixes(src, storage_options)
    found = top + [f for files in listing.list_objects(src, prefixes, storage_options).values() for f in files]
    # Sorted as full paths, like the local walk, so a local copy and the bucket plan the same spans.
    files = sorted(storage.join(src, f.key) for f in found if f.key.lower().endswith(TEXT_SUFFIXES))
    if not files:
        raise SourceError(f"{storage.redact(src)}: no .jsonl, .txt or .parquet files")
    return files


def text_key(src: str, path: str) -> str:
    """The sample-key prefix of a text file: its path relative to a SRC folder, or its name when SRC is the file."""
    folder = src.rstrip("/") + "/"
    return path[len(folder):] if path.startswith(folder) else path.rsplit("/", 1)[-1]


def _open(path: str, storage_options: dict[str, Any] | None) -> Any:
    """A binary file object for a local path or URL; a vanished file is a SourceError naming it."""
    try:
        if storage.is_local(path):
            return open(storage.local_path(path), "rb")
        fs, fs_path = storage.filesystem(path, storage_options)
        return fs.open(fs_path, "rb")
    except FileNotFoundError:
        raise SourceError(f"{storage.redact(path)}: file disappeared after SRC was listed (deleted or moved)") from None


def text_spans(path: str, target_bytes: int, storage_options: dict[str, Any] | None = None) -> list[TextSpan]:
    """Split a text file into spans of whole documents of about `target_bytes` each."""
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        with _open(path, storage_options) as f:
            meta = pq.ParquetFile(f).metadata
        starts = np.concatenate([[0], np.cumsum([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])])
        sizes = np.concatenate([[0], np.cumsum([meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)])])
        return _group(path, starts, sizes, target_bytes)
    data = np.frombuffer(read_file(path, storage_options), np.uint8)
    ends = np.flatnonzero(data == ord("\n")) + 1
    if len(data) and (not len(ends) or ends[-1] != len(data)):
        ends = np.append(ends, len(data))
    line_starts = np.concatenate([[0], ends])
    return _group(path, np.arange(len(line_starts)), line_starts, target_bytes)


def _group(path: str, index: np.ndarray, offsets: np.ndarray, target_bytes: int) -> list[TextSpan]:
    """Cut [0, len(index)-1) into runs whose byte size (from `offsets`) is about `target_bytes`."""
    spans, start, count = [], 0, len(index) - 1
    while start < count:
        stop = int(np.searchsorted(offsets, offsets[start] + target_bytes, side="right")) - 1
        stop = min(max(stop, start + 1), count)
        spans.append(TextSpan(path, int(index[start]), int(index[stop]), int(offsets[start]), int(offsets[stop])))
        start = stop
    return spans


def read_documents(span: TextSpan, text_field: str, storage_options: dict[str, Any] | None = None) -> Iterator[tuple[int, Any]]:
    """Yield (line or row number, document) for a span: a string, or a list of token ids if pre-tokenized.

    A bad row yields a SourceError in place of its document, so the caller's error policy decides.
    """
    if span.path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        with _open(span.path, storage_options) as f:
            pf = pq.ParquetFile(f)
            groups = [g for g in range(pf.metadata.num_row_groups)]
            starts = np.concatenate([[0], np.cumsum([pf.metadata.row_group(g).num_rows for g in groups])])
            wanted = [g for g in groups if starts[g] >= span.start and starts[g + 1] <= span.stop]
            if text_field not in pf.schema_arrow.names:
                raise SourceError(f"{span.path}: no column {text_field!r}; columns are {pf.schema_arrow.names} (set text_field)")
            column = pf.read_row_groups(wanted, columns=[text_field]).column(0).to_pylist()
        for offset, value in enumerate(column):
            if value is None:
                value = SourceError(f"{span.path}: row {span.start + offset} has no value in {text_field!r}")
            yield span.start + offset, value
        return
    is_txt = span.path.lower().endswith(".txt")
    with _open(span.path, storage_options) as f:
        f.seek(span.byte_start)
        lines = f.read(span.byte_stop - span.byte_start).split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for offset, raw in enumerate(lines):
        number = span.start + offset + 1  # 1-based line numbers in messages, as editors show them
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, SourceError(f"{span.path}:{number}: not valid UTF-8 ({exc.reason} at byte {exc.start})")
            continue
        if is_txt:
            yield number, line
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, SourceError(f"{span.path}:{number}: not valid JSON ({exc.msg})")
            continue
        if not isinstance(record, dict) or text_field not in record:
            yield number, SourceError(f"{span.path}:{number}: no field {text_field!r} in this row (see text_field)")
            continue
        yield number, record[text_field]


Tokenize = Callable[[str], np.ndarray]


def make_tokenizer(name: str) -> tuple[Tokenize | None, int | None]:
    """Return (encode function, vocabulary size): "bytes" (UTF-8 byte ids), "none" (pre-tokenized) or a tokenizer.json."""
    if name == "bytes":
        return (lambda text: np.frombuffer(text.encode("utf-8"), np.uint8)), 256
    if name in ("none", "pretokenized"):
        return None, None
    if not os.path.isfile(name):
        raise ConfigError(f"tokenizer={name!r}: expected 'bytes', 'none' or the path of a Hugging Face tokenizer.json")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise MissingExtraError("a Hugging Face tokenizer.json", "tokenizers", "tokenizers") from None
    tok = Tokenizer.from_file(name)
    return (lambda text: np.asarray(tok.encode(text, add_special_tokens=False).ids, np.uint32)), tok.get_vocab_size()


def to_tokens(
    where: str, document: Any, tokenize: Tokenize | None, vocab_size: int | None, dtype: np.dtype
) -> np.ndarray:
    """Tokenize a document (or check a pre-tokenized one) into an array of `dtype`."""
    if isinstance(document, SourceError):
        raise document
    if isinstance(document, str):
        if tokenize is None:
            raise SourceError(f"{where}: found text but tokenizer='none' expects lists of token ids")
        ids = tokenize(document)
    elif isinstance(document, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in document):
        ids = np.asarray(document, np.int64)
        if ids.size and ids.min() < 0:
            raise SourceError(f"{where}: negative token id {int(ids.min())}")
    else:
        raise SourceError(f"{where}: expected a string or a list of integer token ids, got {type(document).__name__}")
    limit = vocab_size if vocab_size is not None else np.iinfo(dtype).max + 1
    if ids.size and int(ids.max()) >= limit:
        raise SourceError(f"{where}: token id {int(ids.max())} is outside the vocabulary of {limit} (vocab_size)")
    return ids.astype(dtype, copy=False)
