"""Image inputs for packing: list an ImageNet-style image tree and turn one image file into a sample.

Listing is sorted and stable, so the same input always packs into the same shards.
"""

from __future__ import annotations

import io
import os
import re
import stat
from dataclasses import dataclass
from typing import Any, Iterator

from PIL import Image, UnidentifiedImageError

from stoker import storage
from stoker.errors import SourceError
from stoker.formats.image_header import ends_whole, image_size
from stoker.formats.sources.files import check_key, is_utf8, read_file, shown

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageItem:
    """One image file: its key (path relative to SRC), class label and size in bytes."""

    key: str
    label: int
    size: int


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
        if not is_utf8(entry.name):
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
    bad = [c for c in classes if not is_utf8(c)]
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
    """The image re-encoded as JPEG with its longer side `max_side`: (bytes, width, height), PIL's order."""
    scale = max_side / max(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    image.draft("RGB", size)
    resized = image.convert("RGB").resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    resized.save(out, format="JPEG", quality=quality)
    return out.getvalue(), size[0], size[1]
