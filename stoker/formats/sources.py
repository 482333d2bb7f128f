"""Raw inputs for packing: list an ImageNet-style image tree or text files, and turn one item into a sample.

Listing is sorted and stable, so the same input always packs into the same shards.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from stoker import storage
from stoker.errors import ConfigError, MissingExtraError, SourceError
from stoker.formats.image_header import ends_whole, image_size
from stoker.names import unsafe_name

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TEXT_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")


@dataclass(frozen=True)
class ImageItem:
    """One image file: its key (path relative to SRC), class label and size in bytes."""

    key: str
    label: int
    size: int


def check_key(key: str) -> str:
    """Reject keys that could name something outside the dataset (see `stoker.names.unsafe_name`)."""
    why = unsafe_name(key, nested=True)
    if why is not None:
        raise SourceError(f"{key!r}: unsafe sample key ({why}); rename the file")
    return key


def shown(key: str) -> str:
    """A file name as text that can always be printed and stored: bytes that are not UTF-8 as \\xNN escapes."""
    return os.fsencode(key).decode("utf-8", "backslashreplace")


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes of the file name, kept by Python as lone surrogates
        return False


@dataclass
class _Walk:
    """What one listing of a local image tree has seen: every directory and file once, by (device, inode).

    Symlinks are followed, but a sample is listed once, under the class folder it really sits in: a link into
    SRC itself or into another class folder, a loop, or a second path to a file already listed is a problem,
    never a duplicated sample under a wrong label.
    """

    root: str  # real path of SRC
    claimed: dict[tuple[int, int], str]  # directory identity -> its SRC-relative path (SRC itself is "")
    files: dict[tuple[int, int], str]
    problems: list[tuple[str, str]]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk_files(walk: _Walk, rel: str, klass: str) -> Iterator[tuple[str, int]]:
    """Yield (key, size) of the files below SRC/rel, keys relative to SRC; follows symlinks (see `_Walk`)."""
    folder = os.path.join(walk.root, rel)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        walk.problems.append((shown(rel), f"unreadable directory: {exc.strerror}"))
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        key = f"{rel}/{entry.name}"
        if not _utf8(entry.name):
            walk.problems.append((shown(key), "file name is not valid UTF-8 (sample keys are text); rename it"))
            continue
        try:
            info = entry.stat()  # follows symlinks, like open() will
        except OSError as exc:
            walk.problems.append((key, f"unreadable: {exc.strerror} (broken symlink?)"))
            continue
        ident = (info.st_dev, info.st_ino)
        if entry.is_symlink():
            real = os.path.realpath(entry.path)
            home = os.path.join(walk.root, klass)
            if _inside(real, walk.root) and not _inside(real, os.path.realpath(home)):
                target = os.path.relpath(real, walk.root)
                walk.problems.append((key, f"symlink to {'SRC itself' if target == '.' else repr(target)}, outside "
                                      f"its class folder {klass!r}: not packed, so that no sample is listed twice or "
                                      "under another class"))
                continue
        if stat.S_ISDIR(info.st_mode):
            if ident in walk.claimed:
                first = walk.claimed[ident]
                walk.problems.append((key, f"the same directory as {first!r} (symlink loop or second link to it): "
                                      "listed once only"))
                continue
            walk.claimed[ident] = key
            yield from _walk_files(walk, key, klass)
        elif ident in walk.files:
            walk.problems.append((key, f"the same file as {walk.files[ident]!r} (a link to it): packed once only"))
        else:
            walk.files[ident] = key
            yield key, info.st_size


def _listed(src: str, files: list[str], name: str, problems: list[tuple[str, str]]) -> Iterator[str]:
    """The entries of a precomputed file list that lie in class `name`, checked to exist."""
    for key in files:
        if key.split("/", 1)[0] == name:
            if os.path.isfile(os.path.join(src, key)):
                yield key
            else:
                problems.append((key, "listed in files_from but missing"))


def _remote_classes(
    src: str, classes: list[str], files: list[str] | None, sizes: dict[str, int] | None,
    storage_options: dict[str, Any] | None, problems: list[tuple[str, str]],
) -> dict[str, list[tuple[str, int]]]:
    """{class: [(key, size)]} of a bucket prefix: one parallel listing per class, or the --files-from list."""
    from stoker.formats import listing

    if files is None:
        found = listing.list_objects(src, classes, storage_options)
        return {name: [(f.key, f.size) for f in found[name]] for name in classes}
    sizes = dict(sizes or {})
    unknown = [key for key in files if key not in sizes]
    sizes.update(zip(unknown, listing.stat_objects(src, unknown, storage_options)))
    by_class: dict[str, list[tuple[str, int]]] = {name: [] for name in classes}
    for key in files:
        if sizes[key] is None:
            problems.append((key, "listed in files_from but missing"))
        else:
            by_class[key.split("/", 1)[0]].append((key, sizes[key]))
    return by_class


def list_image_tree(
    src: str, *, skip_errors: bool = False, files: list[str] | None = None, sizes: dict[str, int] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> tuple[list[str], list[ImageItem], list[dict[str, str]]]:
    """List `src/<class>/**/<file>` (or the SRC-relative paths in `files`); return (classes, items, skipped).

    `src` is a local path or an fsspec URL (listed in parallel by class prefix, see stoker.formats.listing);
    `sizes` gives known sizes of `files` so a remote SRC needs no request per file.
    Raises SourceError on the first problem unless `skip_errors`.
    """
    remote = not storage.is_local(src)
    if not remote and not os.path.isdir(src):
        raise SourceError(f"{src}: not a directory; expected an ImageNet-style tree SRC/<class>/<image>")
    if files is not None:
        files = sorted({f.strip().removeprefix("./") for f in files if "/" in f.strip()})
        classes = sorted({f.split("/", 1)[0] for f in files})
    elif remote:
        from stoker.formats import listing

        classes = listing.list_prefixes(src, storage_options)[0]
    else:
        classes = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    problems: list[tuple[str, str]] = []
    bad = [c for c in classes if not _utf8(c)]
    problems += [(shown(c), "class folder name is not valid UTF-8 (class names are text); rename it") for c in bad]
    classes = [c for c in classes if c not in bad]
    if not classes:
        raise SourceError(f"{storage.redact(src)}: no class directories; expected SRC/<class>/<image>")
    walk = None
    if not remote and files is None:
        real = os.path.realpath(src)
        walk = _Walk(real, {}, {}, problems)
        aliases = []
        for name in ["", *classes]:  # SRC and the class folders are where they are: links to them are not
            path = os.path.join(real, name)
            target = os.path.realpath(path)
            if name and os.path.islink(path) and _inside(target, real):
                # A class folder that links into SRC would pack another class's images under its own label.
                where = os.path.relpath(target, real)
                problems.append((name, f"class folder is a symlink to {'SRC itself' if where == '.' else repr(where)}: "
                                 "not packed, so that no image is labelled with two classes"))
                aliases.append(name)
                continue
            st = os.stat(path)
            walk.claimed.setdefault((st.st_dev, st.st_ino), name or ".")
        classes = [c for c in classes if c not in aliases]
    remote_keys = _remote_classes(src, classes, files, sizes, storage_options, problems) if remote else {}
    items: list[ImageItem] = []
    for label, name in enumerate(classes):
        found = 0
        if remote:
            keys: Iterator[tuple[str, int | None]] = iter(remote_keys[name])
        else:
            if walk is not None:
                keys = _walk_files(walk, name, name)
            else:
                keys = ((key, None) for key in _listed(src, files, name, problems))
        for key, size in keys:
            if not key.lower().endswith(IMAGE_SUFFIXES):
                problems.append((key, f"not an image file (suffix not one of {', '.join(IMAGE_SUFFIXES)})"))
                continue
            try:
                check_key(key)
            except SourceError as exc:
                problems.append((key, str(exc)))
                continue
            items.append(ImageItem(key, label, size if size is not None else os.path.getsize(os.path.join(src, key))))
            found += 1
        if found == 0:
            problems.append((name, "empty class directory: no images"))
    if problems and not skip_errors:
        where = storage.redact(src) if remote else src
        lines = [f"  {path}: {why}" for path, why in problems[:_SHOWN]]
        if len(problems) > _SHOWN:
            lines.append(f"  ... and {len(problems) - _SHOWN} more (on_error='skip' records every one in the manifest)")
        raise SourceError(f"{where}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in SRC "
                          f"(paths relative to it); fix them or pass on_error='skip':\n" + "\n".join(lines))
    return classes, items, [{"path": p, "error": e} for p, e in problems]


_SHOWN = 100  # problems listed in the error message; the skip policy's manifest records all of them


VALIDATE_LEVELS = ("none", "header", "decode")


def _check_complete(data: bytes, image: Image.Image) -> None:
    """Cheap structural check: a JPEG must end with its EOI marker, a PNG with its IEND chunk."""
    if not ends_whole(image.format or "", data):
        ending = "end-of-image marker" if image.format == "JPEG" else "IEND chunk"
        raise OSError(f"{image.format} ends without its {ending} (truncated)")


def read_file(path: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The bytes of a source file (local path or URL); one that vanished since it was listed is a SourceError."""
    try:
        if storage.is_local(path):
            with open(storage.local_path(path), "rb") as f:
                return f.read()
        return storage.read_bytes(path, storage_options)
    except FileNotFoundError:
        # Listing and reading are minutes apart at scale; say so rather than a bare errno.
        raise SourceError(f"{storage.redact(path)}: file disappeared after SRC was listed (deleted or moved)") from None
    except OSError as exc:
        raise SourceError(f"{storage.redact(path)}: unreadable ({type(exc).__name__}: {exc})") from None


def load_image(
    src: str, item: ImageItem, *, max_side: int | None, quality: int, validate: str,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Read one image file into a sample; re-encode only when it is larger than `max_side`.

    `validate`: "header" parses the header and checks the file is complete; "decode" also decodes it at
    reduced size (reads every byte of the compressed data, catching corruption inside it); "none" trusts it.
    """
    path = os.path.join(src, item.key) if storage.is_local(src) else storage.join(src, item.key)
    data = read_file(path, storage_options)
    if not data:
        raise SourceError(f"{storage.redact(path)}: empty file (0 bytes)")
    known = image_size(data) if validate != "decode" else None  # Pillow only for what the header walk leaves
    if known is not None and (max_side is None or max(known[1:]) <= max_side):
        _, width, height = known
    else:
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if max_side is not None and max(width, height) > max_side:
                    data, width, height = _shrink(image, max_side, quality)
                elif validate == "decode":
                    # A reduced-size (DCT-scaled) decode still reads every byte of the entropy-coded data.
                    image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                    image.load()
                elif validate == "header":
                    _check_complete(data, image)
        except UnidentifiedImageError:
            raise SourceError(f"{storage.redact(path)}: not an image (no format Pillow knows starts its "
                              f"{len(data)} bytes)") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            # Pillow's messages can name in-memory objects by address; those mean nothing to the user.
            why = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the file", str(exc))
            raise SourceError(f"{storage.redact(path)}: unreadable image ({type(exc).__name__}: {why})") from None
    return {"key": item.key, "label": item.label, "image": data, "height": height, "width": width}


def _shrink(image: Image.Image, max_side: int, quality: int) -> tuple[bytes, int, int]:
    scale = max_side / max(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    image.draft("RGB", size)
    resized = image.convert("RGB").resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    resized.save(out, format="JPEG", quality=quality)
    return out.getvalue(), size[1], size[0]


# ---- text ------------------------------------------------------------------------------------------------


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
    bad = [f for f in files if not _utf8(f)]
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
