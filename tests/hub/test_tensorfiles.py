"""Reference files as tensor blobs (graft.hub.tensorfiles): a child saved with its parent's
example inputs shares them in the store; every way a module leaves the store (export, a
loaded module's directory, push) gives the file back byte for byte; damage is caught; gc,
index loss and stores written before this layout keep working."""

from __future__ import annotations

import gc as pygc
import hashlib
import json
import os
import sqlite3
import struct
from contextlib import closing
from pathlib import Path
from typing import Callable

import pytest

from graft.errors import IntegrityError
from graft.format.entries import Parent
from graft.format.manifest import Manifest
from graft.hub import index, tensorfiles
from graft.hub.store import Store
from tests.hub.test_store import assert_consistent, assert_no_leftovers, blob, blob_names, tamper
from tests.hub.conftest import WEIGHTS, weights_bytes
from tests.hub.test_tensors import disk_bytes, with_new_weight

REF = "reference/forward.safetensors"


def safetensors(tensors: dict[str, tuple[list[int], bytes]]) -> bytes:
    """A float32 safetensors file of ``name -> (shape, raw bytes)``, in that data order."""
    header, data = {}, b""
    for name, (shape, raw) in tensors.items():
        header[name] = {"dtype": "F32", "shape": shape,
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def floats(seed: int, count: int) -> bytes:
    return struct.pack(f"<{count}f", *(((seed * 7919 + i) % 1000) / 1000 for i in range(count)))


INPUTS = floats(1, 2 * 4 * 1000)  # 32 kB of 'example images', the parent's and the child's


def reference(outputs_seed: int, inputs: bytes = INPUTS) -> bytes:
    return safetensors({"input.input": ([2, 4000], inputs),
                        "output.output": ([2, 2], floats(outputs_seed, 4))})


@pytest.fixture
def family(store: Store, make_module: Callable[..., Path]):
    """A parent and a head-only child saved with the parent's example inputs."""
    parent_weights = weights_bytes("parent", extra=20_000)
    parent_src = make_module("parent", contents={WEIGHTS: parent_weights, REF: reference(1)})
    parent = store.add(parent_src)
    before = disk_bytes(store.root / "blobs")
    child_src = make_module("child", contents={WEIGHTS: with_new_weight(parent_weights),
                                               REF: reference(2)},
                            parents=(Parent(parent.handle, parent.digest),))
    child = store.add(child_src)
    growth = disk_bytes(store.root / "blobs") - before
    return parent, parent_src, child, child_src, growth


def test_a_child_with_its_parents_example_inputs_shares_them(store: Store, family) -> None:
    parent, _, child, _, growth = family
    c, p = child.manifest(), parent.manifest()
    # new blobs: its program and labels, its new 'weight' tensor (32 bytes) and the outputs
    # of its reference file (16 bytes); the 32 kB inputs and the reference header (same
    # names and shapes) are the parent's
    new_files = sum(e.size for rel, e in c.files.items()
                    if rel not in (WEIGHTS, REF) and e.sha256 not in
                    {f.sha256 for f in p.files.values()})
    assert growth == new_files + 32 + 16
    assert growth < 0.05 * c.files[REF].size + new_files + 32
    # the tree holds no reference file, only the record of its blobs
    for module in (parent, child):
        assert not (module.path / REF).exists()
        layout = tensorfiles.read_record(module.path, module.manifest())[REF]
        assert [n for n, _, _ in layout.tensors] == ["input.input", "output.output"]
    inputs = hashlib.sha256(INPUTS).hexdigest()
    assert tensorfiles.read_record(child.path, c)[REF].tensors[0][1] == inputs
    assert blob(store, inputs).stat().st_size == len(INPUTS)


def test_every_way_out_gives_the_file_back_byte_for_byte(store: Store, family,
                                                         tmp_path: Path) -> None:
    from graft.hub.oci.artifact import build_manifest

    _, _, child, source, _ = family
    out = store.export(child.handle, tmp_path / "out")
    for rel in [*child.manifest().files, "graft.json"]:
        assert (out / rel).read_bytes() == (source / rel).read_bytes(), rel
    with store.exported(child.handle) as exported:
        assert (exported / REF).read_bytes() == (source / REF).read_bytes()
    # the OCI manifest pushed from the store's blobs is the one of the module directory:
    # the store's blobs are the artifact's layers
    stored, manifest = store.open(child.handle)
    from_store, plan, sources = build_manifest(manifest, stored.path, blob_path=store.blob_path)
    from_directory, _, _ = build_manifest(Manifest.read(source), source)
    assert from_store == from_directory
    split = plan.tensor_files[REF]
    assert split.tensors[0][1].hex == hashlib.sha256(INPUTS).hexdigest()
    path, start, end = sources[split.tensors[0][1].digest]
    assert path == store.blob_path(split.tensors[0][1].hex) and (start, end) == (0, len(INPUTS))


def test_a_loaded_module_writes_its_directory_out_on_demand(store: Store, family) -> None:
    import graft

    _, _, child, source, _ = family
    module = graft.load(child.handle, store=store)
    directory = module.directory
    assert directory != child.path and directory.parent.parent == store.root / "tmp"
    assert module.directory == directory  # once
    manifest = Manifest.read(source)
    for rel, entry in manifest.files.items():
        assert hashlib.sha256((directory / rel).read_bytes()).hexdigest() == entry.sha256, rel
    assert store.gc().tmp_removed == 0  # in use: kept
    del module
    pygc.collect()
    assert not directory.exists()
    assert sorted((store.root / "tmp").iterdir()) == []


@pytest.mark.parametrize("what", ["inputs", "outputs", "header"])
def test_a_damaged_reference_blob_is_caught(store: Store, family, what: str) -> None:
    _, _, child, _, _ = family
    layout = tensorfiles.read_record(child.path, child.manifest())[REF]
    sha = {"inputs": layout.tensors[0][1], "outputs": layout.tensors[1][1],
           "header": layout.header[0]}[what]
    tamper(blob(store, sha), lambda data: data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(IntegrityError, match="forward.safetensors"):
        store.resolve(child.handle)  # the load check: a write moved the blob's ctime
    with pytest.raises(IntegrityError):
        store.verify(child.handle)
    with pytest.raises(IntegrityError):
        with store.exported(child.handle):
            pass


def test_a_record_that_lies_is_caught(store: Store, family) -> None:
    _, _, child, _, _ = family
    record = child.path / tensorfiles.RECORD
    body = json.loads(record.read_bytes())
    entry = body["files"][REF]
    wrong_sizes = json.loads(json.dumps(body))
    wrong_sizes["files"][REF]["tensors"][1][2] += 4
    tamper(record, lambda _: json.dumps(wrong_sizes).encode())
    with pytest.raises(IntegrityError, match="add up to"):
        store.resolve(child.handle)
    # blobs that exist and are intact but are not this file's: only a full check, which
    # rebuilds the file, can tell; verify and export do
    other = dict(body)
    other["files"] = {REF: {"header": entry["header"],
                            "tensors": [entry["tensors"][1], entry["tensors"][0]]}}
    tamper(record, lambda _: json.dumps(other).encode())
    with pytest.raises(IntegrityError):
        store.verify(child.handle)
    with pytest.raises(IntegrityError):
        with store.exported(child.handle):
            pass


def test_gc_keeps_shared_inputs_until_the_last_module_goes(store: Store, family,
                                                           tmp_path: Path) -> None:
    parent, _, child, source, _ = family
    inputs = hashlib.sha256(INPUTS).hexdigest()
    store.remove(parent.handle)
    store.gc()
    assert blob(store, inputs).exists()
    assert_no_leftovers(store)
    out = store.export(child.handle, tmp_path / "out")
    assert (out / REF).read_bytes() == (source / REF).read_bytes()
    store.remove(child.handle)
    store.gc()
    assert blob_names(store) == set()


def test_a_lost_index_is_rebuilt_with_the_reference_blobs(store: Store, family) -> None:
    before = store.list()
    blobs = blob_names(store)
    (store.root / "index.sqlite").unlink()
    assert [m.digest for m in store.list()] == [m.digest for m in before]
    with closing(sqlite3.connect(store.root / "index.sqlite")) as conn:
        assert conn.execute("SELECT COUNT(*) FROM file_blobs").fetchone()[0] == 2 * 3
    assert store.gc().blobs_removed == 0
    assert blob_names(store) == blobs
    assert_consistent(store)


def test_an_index_without_file_rows_keeps_the_blobs(store: Store, family) -> None:
    blobs = blob_names(store)
    with closing(sqlite3.connect(store.root / "index.sqlite")) as conn:
        conn.execute("DELETE FROM file_blobs")
        conn.commit()
    assert store.gc().blobs_removed == 0
    assert blob_names(store) == blobs
    assert_consistent(store)


def test_a_store_written_before_reference_files_were_split(
        store: Store, make_module: Callable[..., Path], tmp_path: Path) -> None:
    """Schema 3: trees hold whole reference files (hard links to file blobs), no record, no
    file_blobs table. They keep resolving, verifying, exporting, loading; the index is
    migrated in place; gc frees only what nothing references; a new child is split."""
    import graft

    source = make_module("old", contents={REF: reference(1)})
    old = store.add(source)
    whole = blob(store, Manifest.read(source).files[REF].sha256)
    layout = tensorfiles.read_record(old.path, old.manifest())[REF]
    # rewrite the tree and the index as the previous Graft left them
    whole.parent.mkdir(parents=True, exist_ok=True)
    whole.write_bytes((source / REF).read_bytes())
    os.chmod(whole, 0o444)
    (old.path / REF).parent.mkdir()
    os.link(whole, old.path / REF)
    (old.path / tensorfiles.RECORD).unlink()
    with closing(sqlite3.connect(store.root / "index.sqlite")) as conn:
        conn.executescript("DROP TABLE file_blobs; DROP TABLE module_checks; "
                           "PRAGMA user_version = 3;")
    split_only = {sha for sha, _ in layout.blobs()}

    assert [m.digest for m in store.list()] == [old.digest]
    with closing(sqlite3.connect(store.root / "index.sqlite")) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == index.SCHEMA_VERSION
    assert_consistent(store)
    report = store.gc()
    assert report.blobs_removed == len(split_only)  # the split blobs no tree names
    assert whole.exists()
    assert_no_leftovers(store)
    out = store.export(old.handle, tmp_path / "out")
    assert (out / REF).read_bytes() == (source / REF).read_bytes()
    module = graft.load(old.handle, store=store)
    assert (module.directory / REF).read_bytes() == (source / REF).read_bytes()
    del module
    pygc.collect()
    child = store.add(make_module("child", contents={REF: reference(2)},
                                  parents=(Parent(old.handle, old.digest),)))
    assert not (child.path / REF).exists()
    assert_consistent(store)
    assert_no_leftovers(store)


def test_a_reference_file_that_fails_midway_leaves_nothing(
        store: Store, make_module: Callable[..., Path], monkeypatch) -> None:
    from tests.hub.test_store import snapshot

    store.add(make_module("first"))
    before = snapshot(store.root)
    placed = tensorfiles._place_next
    calls = []

    def fail_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the header and the inputs' blob are placed
            raise IntegrityError("reference/forward.safetensors was truncated")
        return placed(*args, **kwargs)

    monkeypatch.setattr(tensorfiles, "_place_next", fail_on_the_second)
    with pytest.raises(IntegrityError, match="truncated"):
        store.add(make_module("second", contents={REF: reference(3)}))
    assert [m.name for m in store.list()] == ["first"]
    files = lambda snap: {k: v for k, v in snap.items() if v is not None}  # noqa: E731
    assert files(snapshot(store.root)) == files(before)  # (empty fan-out folders: gc's)
