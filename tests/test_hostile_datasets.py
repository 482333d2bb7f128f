"""Datasets forged by a hostile author (shards rewritten, manifest re-signed): every reader and `stoker verify` give
a stoker error naming the shard (and row), never run code, and stay within a memory bound measured in a fresh
process (peak RSS) and a time bound (a bound on a hang, not a speed figure).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pyarrow as pa
import pytest
from stoker.synthetic import make_dataset
from _forge import (IMAGE_FIELDS, arrow_file, image_columns, image_record, image_schema, install, msgpack_shard,
                    read_both, resign)

from stoker import StreamingDataset
from stoker.cli import main as stoker_main
from stoker.dataloader import ShardDataset
from stoker.errors import ManifestError, ShardError, StokerError
from stoker.formats.manifest import Manifest
from stoker.formats.verify import verify

pytestmark = pytest.mark.timeout(120)

# Reads the dataset with every reader in a fresh process, then prints the outcomes and the process's peak RSS.
_PROBE = r"""
import json, sys, time
from stoker.errors import StokerError
root = sys.argv[1]
outcomes, start = {}, time.monotonic()
def attempt(name, fn):
    try:
        fn()
        outcomes[name] = "ok"
    except StokerError as exc:
        outcomes[name] = f"{type(exc).__name__}: {exc}"[:1000]
    except BaseException as exc:
        outcomes[name] = f"RAW {type(exc).__name__}: {exc}"[:1000]
def stream():
    from stoker import StreamingDataset
    for _ in StreamingDataset(root, shuffle=False):
        pass
def by_index():
    from stoker.dataloader import ShardDataset
    ds = ShardDataset(root)
    firsts = [int(o) for o in ds.manifest.shard_offsets[:-1]]
    ds.__getitems__(sorted(set(firsts + [len(ds) - 1])) if len(ds) else [])
def cli_verify():
    import contextlib, io
    from stoker.cli import main
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(out):
        code = main(["verify", "--deep", root])
    outcomes["verify_output"] = out.getvalue()[-1000:]
    if code != 1:
        raise AssertionError(f"verify exit {code}")
for name, fn in (("stream", stream), ("index", by_index), ("verify", cli_verify)):
    attempt(name, fn)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec, so a child started by
# a test that built a large input would report the test's peak.
outcomes["rss_mb"] = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
outcomes["seconds"] = time.monotonic() - start
print(json.dumps(outcomes))
"""


def _probe(root: str | Path, timeout: float = 90) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _PROBE, str(root)], capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def baseline_mb(tmp_path_factory) -> float:
    """Peak RSS of the same probe on a small good dataset: interpreter, torch, pyarrow and stoker."""
    root = make_dataset(tmp_path_factory.mktemp("good") / "ds", rows=(8, 8))
    resign(root, lambda body: None)
    result = _probe(root)
    assert result["stream"] == result["index"] == "ok"
    return result["rss_mb"]


def _assert_refused(root: str | Path, baseline_mb: float, case: str, file_bytes: int, *, expect: str,
                    verify_says: str | None = None) -> dict:
    """Every reader refuses the dataset with a stoker error matching `expect`, within baseline + 100 MB + 4 x the
    forged input's size."""
    result = _probe(root)
    bound = baseline_mb + 100 + 4 * file_bytes / 2**20
    print(f"PEAK {case}: {result['rss_mb']:.0f} MB (baseline {baseline_mb:.0f} MB, bound {bound:.0f} MB), "
          f"{result['seconds']:.1f} s")
    for reader in ("stream", "index"):
        assert result[reader].split(":")[0] in ("ShardError", "ManifestError"), (reader, result[reader])
        assert expect in result[reader], (reader, result[reader])
    assert result["verify"] == "ok", result  # exit 1: damaged
    assert (verify_says or expect) in result["verify_output"] and "Traceback" not in result["verify_output"]
    assert result["rss_mb"] < bound, result
    return result


# -- code execution ---------------------------------------------------------------------------------------------

def test_a_pickled_py_extension_type_never_runs(tmp_path):
    """CVE-2023-47248: pyarrow 14.0.0 unpickled `arrow.py_extension_type` field metadata when a file was opened.
    The payload here would only create a marker file (protocol-0 opcodes written by hand: builtins.open(marker, 'w'))."""
    marker = tmp_path / "payload-ran"
    payload = b"cbuiltins\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."
    root = make_dataset(tmp_path / "ds", rows=(6,))
    metadata = {b"ARROW:extension:name": b"arrow.py_extension_type", b"ARROW:extension:metadata": payload}
    schema = image_schema()
    schema = schema.set(2, schema.field("image").with_metadata(metadata))
    install(root, "shard-00000.arrow", arrow_file(schema, [image_columns(6)]))
    for read in (lambda: list(StreamingDataset(root, shuffle=False)), lambda: ShardDataset(root)[0]):
        with pytest.raises(ShardError, match=r"shard-00000\.arrow .*field 'image' carries metadata"):
            read()
    assert stoker_main(["verify", "--deep", root]) == 1
    assert not marker.exists()


# -- memory bounded before trust ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_zstd_bomb_is_refused_before_it_inflates(tmp_path, baseline_mb):
    """65 KB of zstd declaring 4 batches x 8 rows x 60 MB of zeros (1.9 GB inflated)."""
    root = make_dataset(tmp_path / "ds", rows=(32,))
    zeros = pa.py_buffer(bytes(8 * 60 << 20))  # calloc'd: the test itself never touches these pages
    offsets = pa.py_buffer(np.arange(9, dtype=np.int32) * (60 << 20))
    image = pa.Array.from_buffers(pa.binary(), 8, [None, offsets, zeros])
    data = arrow_file(image_schema(), [image_columns(8, image=image, digests=False)] * 4, compression="zstd")
    assert len(data) < 1 << 20
    install(root, "shard-00000.arrow", data)
    _assert_refused(root, baseline_mb, "zstd bomb (65 KB -> 1.9 GB)", len(data), expect="is compressed")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["header", "record"])
def test_msgpack_with_twenty_million_empty_maps_is_refused(tmp_path, baseline_mb, where):
    root = make_dataset(tmp_path / "ds", rows=(4,), fmt="msgpack")
    maps = b"\xdd" + (20_000_000).to_bytes(4, "big") + b"\x80" * 20_000_000  # array32 of 20 M empty maps
    header = msgpack.packb({"version": 1, "fields": IMAGE_FIELDS})
    records = [msgpack.packb(image_record(i)) for i in range(4)]
    if where == "header":
        header = b"\x83" + header[1:] + msgpack.packb("extra") + maps  # a third entry: 20 M maps
    else:
        records[2] = records[2].replace(msgpack.packb("label") + b"\x02", msgpack.packb("label") + maps)
    data = msgpack_shard(header, records)
    install(root, "shard-00000.msgpack", data)
    _assert_refused(root, baseline_mb, f"msgpack {where} of 20 M empty maps", len(data), expect="shard-00000.msgpack")


@pytest.mark.slow
def test_a_claimed_row_count_sizes_nothing_before_it_is_checked(tmp_path, baseline_mb):
    """rows 3e8 for a 6-row shard (bytes raised to match, as a forger would): refused on open, in bounded memory."""
    root = make_dataset(tmp_path / "ds", rows=(6,))
    resign(root, lambda body: body["shards"][0].update(rows=300_000_000, bytes=300_000_000))
    _assert_refused(root, baseline_mb, "rows 3e8 for 6 rows", 4096, expect="has 6 rows but the manifest says",
                    verify_says="manifest says 300000000 (truncated or replaced)")


@pytest.mark.parametrize("rows, why", [(1e12, "is not an integer"), (2**64, "more than 2\\*\\*62"),
                                       (7, "cannot fit in"), ("6", "is not an integer"), (True, "is not an integer")])
def test_row_counts_that_are_not_counts_are_manifest_errors(tmp_path, rows, why):
    root = make_dataset(tmp_path / "ds", rows=(6,))
    resign(root, lambda body: body["shards"][0].update(rows=rows, bytes=6 if rows == 7 else 4096))
    with pytest.raises(ManifestError, match=rf"manifest\.json: shard shard-00000\.arrow: .*{why}"):
        StreamingDataset(root)


@pytest.mark.slow
def test_a_huge_manifest_is_refused_unread(tmp_path, baseline_mb):
    """132 MB of `"skipped": [{}] * 33M`, re-signed: refused by size before it is parsed."""
    root = make_dataset(tmp_path / "ds", rows=(6,))
    path = Path(root) / "manifest.json"
    body = json.loads(path.read_text())
    body.pop("checksum")
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    canonical = canonical.replace('"skipped":[]', '"skipped":[' + ",".join(["{}"] * 33_000_000) + "]")
    import hashlib

    signed = '{"checksum":"' + hashlib.sha256(canonical.encode()).hexdigest() + '",' + canonical[1:]
    path.write_text(signed)
    del canonical
    _assert_refused(root, baseline_mb, "132 MB manifest", 0, expect="limit on manifests", verify_says="damaged")
    del signed
    os.environ["STOKER_MAX_MANIFEST_BYTES"] = str(200 << 20)
    try:  # raised by its owner, the same manifest loads (and is exactly what was signed)
        assert len(Manifest.load(root).skipped) == 33_000_000
    finally:
        del os.environ["STOKER_MAX_MANIFEST_BYTES"]


# -- schema is law ------------------------------------------------------------------------------------------------

def _text_shard(tokens: pa.Array, rows: int = 3) -> bytes:
    schema = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("tokens", tokens.type, nullable=False),
                        pa.field("length", pa.int32(), nullable=False), pa.field("xxh3", pa.uint64(), nullable=False)])
    lengths = pa.array(np.diff(tokens.offsets.to_numpy()), pa.int32())
    return arrow_file(schema, [[pa.array([f"{i:06d}" for i in range(rows)]), tokens, lengths, pa.array([0] * rows, pa.uint64())]])


@pytest.mark.parametrize("tokens", [
    pa.array([[200], [1], [2]], pa.list_(pa.uint8())),
    pa.array([[-5], [1], [-(2**31)]], pa.list_(pa.int32())),
    pa.array([[3.7], [1.0], [2.0]], pa.list_(pa.float32())),
    pa.array([[1], [2], [2**40]], pa.list_(pa.uint64())),
    pa.array([[1], [2], [3]], pa.large_list(pa.uint16())),
], ids=["uint8", "int32", "float32", "uint64", "large_list"])
def test_token_columns_of_another_type_are_refused_before_any_id_is_served(tmp_path, tokens):
    root = make_dataset(tmp_path / "ds", rows=(3,), kind="text")
    install(root, "shard-00000.arrow", _text_shard(tokens))
    resign(root, lambda body: body.update(vocab_size=50))
    for read in (lambda: list(StreamingDataset(root, shuffle=False)), lambda: ShardDataset(root)[0]):
        with pytest.raises(ShardError, match=r"shard-00000\.arrow at byte offset 0: field 'tokens' is .* but the "
                                             r"manifest declares list<item: uint16>"):
            read()
    assert [p.shard for p in verify(root)] == ["shard-00000.arrow"]


@pytest.mark.parametrize("types", [
    {"image": pa.dictionary(pa.int32(), pa.binary())}, {"image": pa.large_binary()}, {"image": pa.binary_view()},
    {"key": pa.large_string()}, {"key": pa.string_view()}, {"label": pa.float64()}, {"label": pa.int64()},
], ids=lambda t: f"{next(iter(t))}-{next(iter(t.values()))}")
def test_columns_of_another_arrow_type_are_refused(tmp_path, types):
    root = make_dataset(tmp_path / "ds", rows=(3,))
    columns = image_columns(3)
    for i, name in enumerate(["key", "label", "image", "height", "width"]):
        if name in types:
            columns[i] = columns[i].cast(types[name])
    install(root, "shard-00000.arrow", arrow_file(image_schema(**types), [columns]))
    for read in (lambda: list(StreamingDataset(root, shuffle=False)), lambda: ShardDataset(root)[0]):
        with pytest.raises(ShardError, match=rf"shard-00000\.arrow at byte offset \d+: (field '{next(iter(types))}' is"
                                             r"|has dictionary batches)"):
            read()
    assert stoker_main(["verify", root]) == 1


@pytest.mark.parametrize("column, value, expect", [
    ("label", pa.array([0, None, 2], pa.int32()), r"\(row 1\): column 'label' holds a null"),
    ("image", pa.array([b"a", b"b", None], pa.binary()), r"\(row 2\): column 'image' holds a null"),
    ("label", pa.array([0, -1, 2], pa.int32()), r"\(row 1\): label -1 is outside the manifest's 10 classes"),
    ("label", pa.array([0, 1, 2**31 - 1], pa.int32()), r"\(row 2\): label 2147483647 is outside"),
    ("height", pa.array([1, -3, 1], pa.int32()), r"\(row 1\): column 'height' is negative"),
])
def test_nulls_and_labels_outside_the_classes_name_the_row(tmp_path, column, value, expect):
    root = make_dataset(tmp_path / "ds", rows=(3,))
    columns = image_columns(3)
    columns[["key", "label", "image", "height", "width"].index(column)] = value
    install(root, "shard-00000.arrow", arrow_file(image_schema(), [columns]))
    for read in (lambda: list(StreamingDataset(root, shuffle=False)), lambda: ShardDataset(root)[0]):
        with pytest.raises(ShardError, match=r"shard-00000\.arrow " + expect):
            read()
    row = int(expect.split(" ")[1].split("\\")[0])
    assert [(p.shard, p.row) for p in verify(root)] == [("shard-00000.arrow", row)]


def test_a_manifest_with_fewer_classes_than_labels_is_refused(tmp_path):
    root = make_dataset(tmp_path / "ds", rows=(10,))
    resign(root, lambda body: body.update(classes=["a", "b"]))
    with pytest.raises(ShardError, match=r"shard-00000\.arrow \(row 2\): label 2 is outside the manifest's 2 classes"):
        list(StreamingDataset(root, shuffle=False))
    problems = verify(root)
    assert [p.row for p in problems] == list(range(2, 10))  # every bad row, not only the first


@pytest.mark.parametrize("edit, expect", [
    (lambda b: b["shards"].append(dict(b["shards"][0])), "shard shard-00000.arrow is listed more than once"),
    (lambda b: b.update(vocab_size="abc"), "vocab_size 'abc' is not an integer"),
    (lambda b: b.update(token_dtype="O"), "token_dtype 'O' given for an image dataset"),
    (lambda b: b.update(kind="video"), "kind 'video'"),
    (lambda b: b.update(classes="abc"), "classes is not a list of strings"),
    (lambda b: b["schema"].update(label="double"), "type 'double' is not one stoker reads"),
    (lambda b: b["schema"].update(image="string"), "schema field 'image' is 'string'"),
    (lambda b: b["schema"].pop("xxh3"), "schema field 'xxh3' is None; a image dataset has 'uint64'"),
    (lambda b: b["shards"][0].update(lengths="AAAA"), "lengths are not base64"),
    (lambda b: b.update(shards={"a": 1}), "shards is not a list"),
    (lambda b: b.update(options=[1]), "options is not a JSON object"),
])
def test_manifest_fields_are_typed_and_range_checked(tmp_path, edit, expect):
    root = make_dataset(tmp_path / "ds", rows=(4,))
    resign(root, edit)
    with pytest.raises(ManifestError, match=expect):
        StreamingDataset(root)
    assert stoker_main(["verify", root]) == 1


def test_row_counts_that_add_up_past_int64_are_a_manifest_error(tmp_path):
    root = make_dataset(tmp_path / "ds", rows=(4, 4, 4))
    resign(root, lambda body: [s.update(rows=2**61, bytes=2**61) for s in body["shards"]])
    with pytest.raises(ManifestError, match="rows add up to more than 2"):
        Manifest.load(root)


def test_an_integer_of_thousands_of_digits_is_a_manifest_error(tmp_path):
    root = make_dataset(tmp_path / "ds", rows=(4,))
    path = Path(root) / "manifest.json"
    path.write_text(path.read_text().replace('"options": {}', '"options": {"x": ' + "9" * 5000 + "}"))
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(root)


def test_deeply_nested_json_is_a_manifest_error(tmp_path):
    root = make_dataset(tmp_path / "ds", rows=(4,))
    resign(root, lambda body: body.update(options={"x": json.loads("[" * 900 + "]" * 900)}))
    text = (Path(root) / "manifest.json").read_text().replace("[" * 900, "[" * 5000).replace("]" * 900, "]" * 5000)
    (Path(root) / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match="nested too deeply"):
        Manifest.load(root)


@pytest.mark.parametrize("case, expect", [
    ("header_list", "unreadable header or index"),
    ("label_2_40", "field 'label' value 1099511627776 does not fit int32"),
    ("label_str", "field 'label' holds str '2', not int32"),
    ("label_float", "field 'label' holds float '1.5', not int32"),
    ("label_nil", "field 'label' holds NoneType"),
    ("label_bool", "field 'label' holds bool"),
    ("nested", "record 1 is corrupt"),
    ("unknown_type", "unsupported field type"),
])
def test_msgpack_values_of_the_wrong_type_are_shard_errors(tmp_path, case, expect):
    root = make_dataset(tmp_path / "ds", rows=(3,), fmt="msgpack")
    fields = dict(IMAGE_FIELDS)
    header = msgpack.packb({"version": 1, "fields": fields})
    records = [image_record(i) for i in range(3)]
    if case == "header_list":
        header = msgpack.packb([1, fields])
    elif case == "unknown_type":
        header = msgpack.packb({"version": 1, "fields": dict(fields, label="double")})
    else:
        records[1]["label"] = {"label_2_40": 2**40, "label_str": "2", "label_float": 1.5, "label_nil": None,
                               "label_bool": True, "nested": {"a": {}}}[case]
    install(root, "shard-00000.msgpack", msgpack_shard(header, [msgpack.packb(r) for r in records]))
    for read in (lambda: list(StreamingDataset(root, shuffle=False)), lambda: ShardDataset(root)[0]):
        with pytest.raises(ShardError, match=r"shard-00000\.msgpack.*" + expect):
            read()
    assert stoker_main(["verify", root]) == 1


# -- stoker verify ------------------------------------------------------------------------------------------------

def test_verify_lists_every_bad_shard_and_row_and_counts_shards(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", rows=(6, 6, 6))
    for name, bad_rows in (("shard-00000.arrow", (1, 4)), ("shard-00002.arrow", (0,))):
        labels = np.arange(6, dtype=np.int32)
        labels[list(bad_rows)] = -1
        install(root, name, arrow_file(image_schema(), [image_columns(6, label=pa.array(labels))]))
    assert stoker_main(["verify", root]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out[:-1]] == [
        "BAD shard-00000.arrow (row 1)", "BAD shard-00000.arrow (row 4)", "BAD shard-00002.arrow (row 0)"]
    assert out[-1] == "1/3 shards verified; 2 bad (3 bad rows)"


def test_verify_exit_codes_tell_damaged_from_could_not_check(tmp_path, capsys):
    from stoker.testing import free_port

    root = make_dataset(tmp_path / "ds", rows=(6,))
    assert stoker_main(["verify", root]) == 0
    assert stoker_main(["verify", f"http://127.0.0.1:{free_port()}/ds"]) == 2  # nothing listens there
    assert stoker_main(["verify", str(tmp_path / "nowhere")]) == 1  # no manifest: not an intact dataset
    (Path(root) / "manifest.json").write_text("{")
    assert stoker_main(["verify", root]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err and "could not check" in captured.err


# -- secrets -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["s3://AKIAKEYKEY:SECRETSECRET@bucket/ds", "s3://AKIAKEYKEY:SECRET/SECRET@bucket/ds",
                                 "gs://AKIAKEYKEY:SECRETSECRET@bucket/ds"])
def test_credentials_in_an_object_store_url_never_reach_a_message(url, capsys, caplog):
    with pytest.raises(StokerError) as info:
        StreamingDataset(url)
    assert stoker_main(["verify", url]) == 2
    assert stoker_main(["inspect", url]) == 2
    captured = capsys.readouterr()
    text = str(info.value) + repr(info.value) + captured.out + captured.err + caplog.text
    assert "pass them in storage_options" in text
    assert "AKIAKEYKEY" not in text and "SECRET" not in text


# -- shards changed under a reader -------------------------------------------------------------------------------

_TRUNCATE = r"""
import os, sys
from stoker import StreamingDataset
from stoker.dataloader import ShardDataset
from stoker.errors import ShardError
root = sys.argv[1]
first, second = (os.path.join(root, f"shard-0000{i}.arrow") for i in (0, 1))
it = iter(StreamingDataset(root, shuffle=False))
next(it)                                         # shard 0 is open and mapped
os.truncate(first, os.path.getsize(first) // 4)  # cp / rsync --inplace over a live dataset
try:
    for _ in it:
        pass
    print("stream: no error")
except ShardError as exc:
    print("stream:", exc)
ds = ShardDataset(root)
ds[1000]                                         # shard 1 is open and mapped
os.truncate(second, os.path.getsize(second) // 4)
try:
    ds[1700]
    print("index: no error")
except ShardError as exc:
    print("index:", exc)
"""


def test_a_shard_truncated_while_mapped_is_an_error_naming_it_not_sigbus(tmp_path):
    root = make_dataset(tmp_path / "ds", rows=(1000, 1000), payload=(2000, 2001))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    done = subprocess.run([sys.executable, "-c", _TRUNCATE, root], capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])  # -7 would be SIGBUS
    lines = done.stdout.splitlines()
    assert lines[0].startswith("stream: shard-00000.arrow: changed on disk while being read"), lines
    assert lines[1].startswith("index: shard-00001.arrow"), lines


# -- seeded fuzz of manifest fields and shard schemas -----------------------------------------------------------

_JUNK = [None, True, -1, 0, 3, 2**63, 1e12, 1.5, "", "7", "uint16", "list<item: uint8>", [], [1], ["a"], {}, {"a": 1},
         "../x", "A" * 64]
_CASTS = [pa.int8(), pa.int16(), pa.int64(), pa.uint32(), pa.float32(), pa.float64(), pa.large_binary(),
          pa.large_string(), pa.string(), pa.binary(), pa.list_(pa.uint8()), pa.list_(pa.int64())]


def _fuzz_manifest(body: dict, rng: np.random.Generator) -> None:
    junk = _JUNK[int(rng.integers(len(_JUNK)))]
    target = int(rng.integers(4))
    if target == 0:
        body[["kind", "format", "classes", "vocab_size", "token_dtype", "tokenizer", "skipped", "options"][
            int(rng.integers(8))]] = junk
    elif target == 1:
        body["shards"][int(rng.integers(len(body["shards"])))][
            ["name", "rows", "bytes", "sha256", "lengths"][int(rng.integers(5))]] = junk
    elif target == 2:
        body["schema"][list(body["schema"])[int(rng.integers(len(body["schema"])))]] = junk
    else:
        body["classes"] = [f"c{i}" for i in range(int(rng.integers(0, 12)))]


def _fuzz_schema(root: Path, rng: np.random.Generator) -> None:
    name = "shard-00000.arrow"
    table = pa.ipc.open_file(str(root / name)).read_all().combine_chunks()
    column = int(rng.integers(table.num_columns))
    target = _CASTS[int(rng.integers(len(_CASTS)))]
    try:
        values = table.column(column).cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return
    schema = table.schema.set(column, pa.field(table.schema.field(column).name, target, nullable=bool(rng.integers(2))))
    install(root, name, arrow_file(schema, [[values.combine_chunks() if i == column else table.column(i).combine_chunks()
                                              for i in range(table.num_columns)]]))


def _check_valid(samples: list[dict], manifest: Manifest) -> None:
    for sample in samples:
        assert isinstance(sample["key"], str)
        if manifest.kind == "image":
            assert isinstance(sample["image"], bytes)
            assert isinstance(sample["label"], int) and 0 <= sample["label"] < (len(manifest.classes) or 2**31)
        else:
            tokens = sample["tokens"]
            assert tokens.dtype == np.dtype(manifest.token_dtype) and len(tokens) == sample["length"]
            assert manifest.vocab_size is None or not len(tokens) or int(tokens.max()) < manifest.vocab_size


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["image", "text"])
def test_fuzzed_manifest_fields_and_shard_schemas_give_valid_samples_or_stoker_errors(tmp_path, kind):
    import shutil

    good = make_dataset(tmp_path / "good", rows=(5, 5), kind=kind)
    rng = np.random.default_rng(19)
    outcomes = {"ok": 0, "error": 0}
    for case in range(60):
        root = tmp_path / f"case{case}"
        shutil.copytree(good, root)
        if rng.integers(2):
            _fuzz_schema(root, rng)
        if rng.random() < 0.7:
            resign(root, lambda body: _fuzz_manifest(body, rng))
        try:
            stream, by_index = read_both(root)
        except StokerError:
            outcomes["error"] += 1
        else:
            manifest = Manifest.load(str(root))
            assert len(stream) == len(by_index) == manifest.num_samples == 10
            _check_valid(stream + by_index, manifest)
            outcomes["ok"] += 1
        shutil.rmtree(root)
    assert outcomes["ok"] >= 5 and outcomes["error"] >= 20, outcomes  # both outcomes are exercised
