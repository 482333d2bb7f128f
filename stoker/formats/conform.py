"""What a dataset from someone else must conform to before a byte of it is served.

A manifest is only as trustworthy as whoever could write its directory (its checksum has no key), so the shards are
held to it and it is held to what stoker writes: manifest fields typed and range-checked, each shard's schema
exactly the manifest's (no dictionary, view, large or extension variants, no field metadata, nothing nullable), and
the values a schema cannot bound checked batch by batch (no nulls, labels within `classes`, token ids within the
vocabulary, `length` equal to the token count). Every failure is a ManifestError or a ShardError naming the file
and row.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import pyarrow as pa

from stoker.errors import ManifestError, ShardError
from stoker.formats.integrity import COLUMN as CHECKSUM
from stoker.formats.schema import Kind, describe, schema_for
from stoker.formats.shard import arrow_to_numpy, format_names

_TYPES = {
    "string": pa.string(), "binary": pa.binary(),
    "int8": pa.int8(), "int16": pa.int16(), "int32": pa.int32(), "int64": pa.int64(),
    "uint8": pa.uint8(), "uint16": pa.uint16(), "uint32": pa.uint32(), "uint64": pa.uint64(),
    "list<item: uint16>": pa.list_(pa.uint16()), "list<item: uint32>": pa.list_(pa.uint32()),
}
_KINDS = get_args(Kind)
_TOKEN_DTYPES = {"uint16": 1 << 16, "uint32": 1 << 32}
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


@dataclass(frozen=True)
class Rules:
    """What every shard of one dataset must hold: its schema (field -> Arrow type), the number of classes labels
    must stay below (0: no classes recorded, labels must only be non-negative) and the vocabulary size."""

    schema: Mapping[str, str]
    classes: int = 0
    vocab_size: int | None = None


def arrow_type(name: str, where: str) -> pa.DataType:
    """The Arrow type a manifest or msgpack header names; a ShardError naming `where` for any other."""
    found = _TYPES.get(name) if isinstance(name, str) else None
    if found is None:
        raise ShardError(where, f"unsupported field type {str(name)[:80]!r}")
    return found


def check_manifest_fields(data: dict[str, Any]) -> tuple[Any, ...]:
    """The typed fields of a parsed manifest (kind, format, schema, classes, vocab_size, token_dtype, tokenizer,
    skipped, options, shard entries), or a ManifestError saying which one is wrong."""
    kind, fmt = data.get("kind"), data.get("format")
    if not _one_of(kind, _KINDS):
        raise ManifestError(f"kind {str(kind)[:40]!r} is not 'image' or 'text'")
    if not _one_of(fmt, format_names()):
        raise ManifestError(f"format {str(fmt)[:40]!r} is not one of {', '.join(format_names())}")
    dtype, vocab = data.get("token_dtype"), data.get("vocab_size")
    if kind == "text" and not _one_of(dtype, _TOKEN_DTYPES):
        raise ManifestError(f"token_dtype {str(dtype)[:40]!r} is not one of {', '.join(_TOKEN_DTYPES)}")
    if kind == "image" and dtype is not None:
        raise ManifestError(f"token_dtype {str(dtype)[:40]!r} given for an image dataset")
    if vocab is not None:
        if not isinstance(vocab, int) or isinstance(vocab, bool) or not 1 <= vocab <= _TOKEN_DTYPES.get(str(dtype), 0):
            raise ManifestError(f"vocab_size {str(vocab)[:40]!r} is not an integer from 1 to what "
                                f"token_dtype {dtype!r} holds")
    schema = data.get("schema")
    if not isinstance(schema, dict) or not schema:
        raise ManifestError("schema is not a JSON object of field -> Arrow type")
    for name, type_name in schema.items():
        if not _FIELD_NAME.fullmatch(name) or not _one_of(type_name, _TYPES):
            raise ManifestError(f"schema field {name[:80]!r}: type {str(type_name)[:80]!r} is not one stoker reads")
    required = describe(schema_for(kind, np.dtype(dtype) if kind == "text" else None))
    if data.get("format_version") == 1:  # from version 2 on every sample carries its checksum
        del required[CHECKSUM]
    for name, type_name in required.items():
        if schema.get(name) != type_name:
            raise ManifestError(f"schema field {name!r} is {schema.get(name)!r}; a {kind} dataset has {type_name!r}")
    classes = data.get("classes") or []
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ManifestError("classes is not a list of strings")
    if kind == "text" and classes:
        raise ManifestError("classes given for a text dataset")
    tokenizer = data.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise ManifestError("tokenizer is not a string")
    skipped, options, shards = data.get("skipped") or [], data.get("options") or {}, data.get("shards")
    if not isinstance(skipped, list) or not all(isinstance(s, dict) for s in skipped):
        raise ManifestError("skipped is not a list of objects")
    if not isinstance(options, dict):
        raise ManifestError("options is not a JSON object")
    if not isinstance(shards, list):
        raise ManifestError("shards is not a list")
    return (kind, fmt, dict(schema), tuple(classes), vocab, dtype, tokenizer, tuple(skipped), dict(options),
            shards)


def _one_of(value: Any, options: Any) -> bool:
    return isinstance(value, str) and value in options


def check_schema(shard: str, schema: pa.Schema, rules: Rules) -> None:
    """A ShardError unless `schema` is exactly the manifest's: same fields, same types, none nullable, no metadata."""
    names = schema.names
    if sorted(names) != sorted(rules.schema):
        missing = f" (no {CHECKSUM!r} checksum column)" if CHECKSUM in rules.schema and CHECKSUM not in names else ""
        raise ShardError(shard, f"has fields {names} but the manifest declares {sorted(rules.schema)}{missing}; the "
                         "shard was replaced or damaged (run `stoker verify`)", 0)
    for field in schema:
        declared = rules.schema[field.name]
        if str(field.type) != declared or field.type != _TYPES[declared]:
            raise ShardError(shard, f"field {field.name!r} is {field.type} but the manifest declares {declared}", 0)
        if field.nullable or field.metadata:
            what = "is nullable" if field.nullable else f"carries metadata {sorted(field.metadata)[:4]}"
            raise ShardError(shard, f"field {field.name!r} {what}; stoker's shards have neither", 0)
    if schema.metadata:
        raise ShardError(shard, f"schema carries metadata {sorted(schema.metadata)[:4]}; stoker's shards have none", 0)


def check_batch(shard: str, batch: pa.RecordBatch, first_row: int, rules: Rules,
                lengths: np.ndarray | None = None) -> None:
    """A ShardError naming the row unless every value of `batch` (rows from `first_row` of `shard`) is one the
    manifest allows; one vectorised pass per column. `lengths`: the manifest's token counts of these rows, which
    the stored token lists must have."""
    def fail(message: str, at: np.ndarray) -> ShardError:
        return ShardError(shard, message, row=first_row + int(np.flatnonzero(at)[0]))

    for name, column in zip(batch.schema.names, batch.columns):
        if column.null_count:
            raise fail(f"column {name!r} holds a null; the schema forbids them", _nulls(column))
        if pa.types.is_list(column.type):
            values = column.values
            if values.null_count:
                at = int(np.flatnonzero(_nulls(values))[0])
                row = int(np.searchsorted(arrow_to_numpy(column.offsets), at, side="right")) - 1
                raise ShardError(shard, f"column {name!r} holds a null token id", row=first_row + max(row, 0))
            offsets = arrow_to_numpy(column.offsets)
            ids = arrow_to_numpy(values)[offsets[0]:offsets[-1]]
            if rules.vocab_size is not None and len(ids) and int(ids.max()) >= rules.vocab_size:
                first = int(np.flatnonzero(ids >= rules.vocab_size)[0])
                row = int(np.searchsorted(offsets, first + offsets[0], side="right")) - 1
                raise ShardError(shard, f"token id {int(ids[first])} in column {name!r} is outside the "
                                 f"vocabulary of {rules.vocab_size} the manifest declares", row=first_row + row)
        elif name == "label":
            labels = arrow_to_numpy(column)
            bad = labels < 0 if not rules.classes else (labels < 0) | (labels >= rules.classes)
            if bad.any():
                value = int(labels[np.flatnonzero(bad)[0]])
                allowed = f"the manifest's {rules.classes} classes" if rules.classes else "non-negative labels"
                raise fail(f"label {value} is outside {allowed}", bad)
        elif name in ("height", "width"):
            bad = arrow_to_numpy(column) < 0
            if bad.any():
                raise fail(f"column {name!r} is negative", bad)
    if "tokens" not in batch.schema.names:
        return
    counts = np.diff(arrow_to_numpy(batch.column("tokens").offsets))
    if "length" in batch.schema.names:
        said = arrow_to_numpy(batch.column("length"))
        bad = said != counts
        if bad.any():
            at = int(np.flatnonzero(bad)[0])
            raise fail(f"column 'length' says {int(said[at])} but {int(counts[at])} tokens are stored", bad)
    if lengths is not None:
        bad = counts != lengths
        if bad.any():
            at = int(np.flatnonzero(bad)[0])
            raise fail(f"column 'tokens' has {int(counts[at])} tokens but the manifest records {int(lengths[at])}",
                       bad)


def _nulls(array: pa.Array) -> np.ndarray:
    """Which entries of `array` are null, read from its validity bitmap (no pandas, no copy of the values)."""
    bitmap = array.buffers()[0]
    if bitmap is None:
        return np.zeros(len(array), bool)
    bits = np.unpackbits(np.frombuffer(bitmap, np.uint8), bitorder="little")
    return bits[array.offset:array.offset + len(array)] == 0
