"""Tensor-level storage (graft.hub.tensors): each tensor a blob named by the sha256 the manifest
records, so a child costs only what it changed; the loader builds tensors from the blobs, and
a stored module comes back out as its original directory, byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import graft
from graft.errors import IntegrityError, StoreError, UnsafeContentError
from graft.format.entries import FileEntry, Parent, TensorEntry
from graft.format.manifest import Manifest
from graft.hub.store import Store
from graft.hub.tensors import HEADER_LINK
from graft.runtime.load import _read_blobs
from tests.hub.conftest import PROGRAM, program_bytes, weights_bytes
from tests.hub.test_store import WEIGHTS, assert_consistent, assert_no_leftovers, blob_names


def disk_bytes(root: Path) -> int:
    """Bytes of the distinct files under ``root`` (hard links counted once)."""
    seen, total = set(), 0
    for path in root.rglob("*"):
        st = path.lstat()
        if path.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def with_new_weight(weights: bytes) -> bytes:
    """The same safetensors file with the ``weight`` tensor (the 'head') changed."""
    (n,) = struct.unpack("<Q", weights[:8])
    start, end = json.loads(weights[8:8 + n])["weight"]["data_offsets"]
    data = bytearray(weights)
    data[8 + n + start:8 + n + end] = struct.pack("<8f", *range(8))
    return bytes(data)


def test_a_head_only_child_grows_the_store_by_what_it_changed(
        store: Store, make_module: Callable[..., Path]) -> None:
    parent_weights = weights_bytes("parent", extra=100_000)  # a 400 kB 'backbone'
    parent_src = make_module("parent", contents={WEIGHTS: parent_weights})
    parent = store.add(parent_src)
    before = disk_bytes(store.root / "blobs")
    child = store.add(make_module(
        "child", contents={WEIGHTS: with_new_weight(parent_weights)},
        parents=(Parent(parent.handle, parent.digest),)))
    growth = disk_bytes(store.root / "blobs") - before

    # the child's new blobs: its 'weight' tensor (32 bytes), its program and labels; the
    # header (same names and shapes) and the 'extra' and 'bias' tensors are the parent's
    c, p = child.manifest(), parent.manifest()
    new = {rel: e.size for rel, e in c.files.items()
           if rel != WEIGHTS and e.sha256 not in {f.sha256 for f in p.files.values()}}
    assert growth == sum(new.values()) + 32
    assert growth <= 0.05 * parent.size
    assert c.tensors["extra"].sha256 == p.tensors["extra"].sha256
    assert os.path.samefile(child.path / HEADER_LINK, parent.path / HEADER_LINK)


def test_export_gives_back_the_module_directory_byte_for_byte(
        store: Store, make_module: Callable[..., Path], tmp_path: Path) -> None:
    source = make_module("tiny")
    store.add(source)
    out = store.export("tiny", tmp_path / "out")
    manifest = Manifest.read(source)
    for rel in [*manifest.files, "graft.json"]:
        assert (out / rel).read_bytes() == (source / rel).read_bytes(), rel
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == \
        sorted([*manifest.files, "graft.json"])
    assert hashlib.sha256((out / WEIGHTS).read_bytes()).hexdigest() == \
        manifest.files[WEIGHTS].sha256
    with pytest.raises(StoreError, match="already exists"):
        store.export("tiny", out)
    assert Store(tmp_path / "other").add(out).digest == manifest.digest  # a module again


def test_export_of_a_damaged_blob_leaves_nothing(store: Store, make_module: Callable[..., Path],
                                                 tmp_path: Path) -> None:
    stored = store.add(make_module("tiny"))
    blob = store.blob_path(stored.manifest().tensors["extra"].sha256)
    os.chmod(blob, 0o644)
    blob.write_bytes(blob.read_bytes()[:-4] + b"\0\0\0\0")  # same size, new ctime
    with pytest.raises(IntegrityError, match="tensor extra"):
        store.export("tiny", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def _odd_module(directory: Path) -> None:
    """A module of the hub fixtures' program plus buffers of every awkward kind: several
    dtypes, a scalar, an empty tensor, and two equal tensors (one blob)."""
    tensors = {"weight": torch.randn(2, 4), "bias": torch.randn(2),
               "flags": torch.tensor([True, False, True]),
               "steps": torch.tensor(7, dtype=torch.int64),
               "f16": torch.randn(3, 5).half(), "brain": torch.randn(4).bfloat16(),
               "empty": torch.zeros(0, 3), "twin_a": torch.ones(6, dtype=torch.int32),
               "twin_b": torch.ones(6, dtype=torch.int32), "small": torch.arange(5).to(torch.int8)}
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / WEIGHTS))
    (directory / PROGRAM).parent.mkdir()
    (directory / PROGRAM).write_bytes(program_bytes("odd"))
    files = {rel: FileEntry(hashlib.sha256((directory / rel).read_bytes()).hexdigest(),
                            (directory / rel).stat().st_size) for rel in (WEIGHTS, PROGRAM)}
    names = {torch.float32: "float32", torch.bool: "bool", torch.int64: "int64",
             torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int32: "int32",
             torch.int8: "int8"}
    entries = {k: TensorEntry("parameter" if k in ("weight", "bias") else "buffer",
                              names[v.dtype], tuple(v.shape),
                              hashlib.sha256(v.contiguous().reshape(-1).view(torch.uint8).numpy()
                                             .tobytes()).hexdigest())
               for k, v in tensors.items()}
    from graft.format.spec import SignatureSpec

    Manifest(name="odd", version="1.0.0", default_signature="forward", files=files,
             tensors=entries,
             signatures={"forward": SignatureSpec(inputs={"input": "float32[batch,4]"},
                                                  outputs={"output": "float32[batch,2]"},
                                                  programs={"eval": PROGRAM})}
             ).write(directory)


def test_tensors_built_from_blobs_equal_the_file_s(store: Store, tmp_path: Path) -> None:
    _odd_module(tmp_path / "odd")
    stored, manifest = store.open(store.add(tmp_path / "odd").handle)
    blobs = store.tensor_blobs(stored, manifest)
    assert blobs is not None and blobs["twin_a"] == blobs["twin_b"]
    built = _read_blobs(manifest, blobs)
    reference = load_file(str(tmp_path / "odd" / WEIGHTS))  # the safetensors library's reading
    assert set(built) == set(reference)
    for name, tensor in reference.items():
        assert built[name].dtype == tensor.dtype and built[name].shape == tensor.shape, name
        assert torch.equal(built[name], tensor), name
        assert built[name].is_contiguous()
    assert built["twin_a"].data_ptr() != built["twin_b"].data_ptr()  # each its own memory
    # and end to end: the stored module computes what the directory does, bit for bit
    x = torch.randn(3, 4)
    assert torch.equal(graft.load("odd", store=store)(x), graft.load(tmp_path / "odd")(x))


def test_the_loader_builds_every_dtype_shape_and_scalar_from_blobs(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``graft.load`` reads each blob straight into a tensor of its own dtype and shape:
    bfloat16 (which numpy lacks), a scalar, an empty tensor, bools; both when it hashes the
    blob (first load) and when the fingerprint vouches for it (later loads)."""
    from graft.hub import index, tensors

    _odd_module(tmp_path / "odd")
    store.add(tmp_path / "odd")
    reference = load_file(str(tmp_path / "odd" / WEIGHTS))
    # Fingerprints taken from now on count as taken long after the blobs last changed.
    monkeypatch.setattr(index, "now_ns", lambda: time.time_ns() + 2 * index.RACY_NS)
    hashed: list[int] = []
    real_hash = tensors.hash_buffer
    monkeypatch.setattr(tensors, "hash_buffer", lambda view: hashed.append(1) or real_hash(view))
    for when in ("hashed", "vouched"):
        hashed.clear()
        loaded = dict(graft.load("odd", store=store).weights.state_dict())
        assert bool(hashed) == (when == "hashed"), when
        assert set(loaded) == set(reference), when
        for name, tensor in reference.items():
            got = loaded[name]
            assert (got.dtype, got.shape) == (tensor.dtype, tensor.shape), (when, name)
            assert torch.equal(got, tensor) and got.is_contiguous(), (when, name)
        assert loaded["twin_a"].data_ptr() != loaded["twin_b"].data_ptr()


def test_a_manifest_whose_tensor_digest_is_wrong_is_refused_at_add(
        store: Store, module_writer: Callable[..., Manifest], tmp_path: Path) -> None:
    # The file's sha256 is right, a tensor's is not: the file cannot be split into the blobs
    # the manifest names, so nothing is stored.
    source = tmp_path / "liar"
    module_writer(source, "liar", "1.0.0", {WEIGHTS: weights_bytes("liar"),
                                            PROGRAM: program_bytes()})
    data = json.loads((source / "graft.json").read_text())
    data["tensors"]["bias"]["sha256"] = "ab" * 32
    (source / "graft.json").write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        store.add(source)
    assert store.list() == []
    store.gc()
    assert blob_names(store) == set()


@pytest.mark.parametrize("how", ["other names", "other shapes", "a link", "more bytes"])
def test_a_damaged_weights_header_is_caught_on_read(store: Store,
                                                    make_module: Callable[..., Path],
                                                    tmp_path: Path, how: str) -> None:
    stored = store.add(make_module("tiny"))
    link = stored.path / HEADER_LINK
    header = link.read_bytes()
    if how == "other names":
        fake = header.replace(b'"bias"', b'"bi4s"')
    elif how == "other shapes":
        fake = header.replace(b'"shape":[2,4]', b'"shape":[4,2]')
    elif how == "more bytes":
        fake = header + b" " * (1 << 20)
    os.chmod(link, 0o644)
    link.unlink()
    if how == "a link":
        (tmp_path / "elsewhere").write_bytes(header)
        link.symlink_to(tmp_path / "elsewhere")
    else:
        link.write_bytes(fake)
    with pytest.raises((IntegrityError, UnsafeContentError)):
        graft.load("tiny", store=store)
    with pytest.raises((IntegrityError, UnsafeContentError)):
        store.verify("tiny")


def test_an_edited_header_is_caught_even_when_it_describes_the_same_tensors(
        store: Store, make_module: Callable[..., Path]) -> None:
    # Same names, shapes and offsets in another key order: the tensors the loader builds would
    # be unchanged, but the module's weights.safetensors would not be the one it was added
    # with. Reads compare the header with the one the index recorded; verify, which trusts no
    # record, rebuilds the file and compares it with the manifest's sha256.
    stored = store.add(make_module("tiny"))
    link = stored.path / HEADER_LINK
    header = link.read_bytes()
    body = json.loads(header[8:])
    text = json.dumps(dict(reversed(body.items())), separators=(",", ":")).encode()
    fake = header[:8] + text + b" " * (len(header) - 8 - len(text))
    assert fake != header and len(fake) == len(header)
    store.open("tiny")
    os.chmod(link, 0o644)
    link.write_bytes(fake)
    with pytest.raises(IntegrityError, match="does not match the header the store recorded"):
        store.open("tiny")
    with pytest.raises(IntegrityError, match="header was altered"):
        store.verify("tiny")


def test_gc_keeps_the_tensors_a_child_shares_after_its_parent_goes(
        store: Store, make_module: Callable[..., Path]) -> None:
    weights = weights_bytes("family", extra=1000)
    parent = store.add(make_module("parent", contents={WEIGHTS: weights}))
    child = store.add(make_module("child", contents={WEIGHTS: with_new_weight(weights)}))
    store.remove(parent.handle)
    report = store.gc()
    # the parent's own program, labels and 'weight' tensor go; 'bias', 'extra' and the
    # header stay with the child
    assert report.blobs_removed == 3
    assert store.verify(child.handle) == child
    assert_no_leftovers(store)
    x = torch.randn(2, 4)
    assert graft.load(child.handle, store=store)(x).shape == (2, 2)
    store.remove(child.handle)
    store.gc()
    assert blob_names(store) == set()
    assert_consistent(store)


def test_a_lost_index_is_rebuilt_with_the_tensor_rows(store: Store,
                                                      make_module: Callable[..., Path]) -> None:
    weights = weights_bytes("family", extra=1000)
    parent = store.add(make_module("parent", contents={WEIGHTS: weights}))
    store.add(make_module("child", contents={WEIGHTS: with_new_weight(weights)}))
    blobs = blob_names(store)
    (store.root / "index.sqlite").unlink()
    assert [m.name for m in store.list()] == ["child", "parent"]  # rebuilt from the trees
    store.remove(parent.handle)
    store.gc()  # the child's tensors were counted again: only the parent's own blobs go
    assert len(blobs - blob_names(store)) == 3
    assert_no_leftovers(store)
