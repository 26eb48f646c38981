"""Verify on read (graft.hub.trees): every load re-hashes the small files, and hashes the
weights unless their fingerprint vouches for them; any edit of a stored file is caught."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any, Callable

import pytest

import graft.hub.tensors as tensors
import graft.hub.trees as trees
from graft.errors import IntegrityError
from graft.format.manifest import Manifest
from graft.hub.index import RACY_NS
from graft.hub.store import Store
from tests.hub.conftest import weights_bytes
from tests.hub.test_store import PROGRAM, WEIGHTS, assert_consistent, flip_byte, tamper


def wait_for_a_new_timestamp(scratch: Path, after_ns: int) -> None:
    """Return once a file written now gets a ctime later than ``after_ns`` (timestamps are
    coarse: an edit in the same tick as the add would keep the add's ctime). Bounded: the
    clock moves on within one tick."""
    for _ in range(1_000_000):
        scratch.write_bytes(b"tick")
        if scratch.stat().st_ctime_ns > after_ns:
            return
    raise AssertionError("the file-system clock does not move")


@pytest.fixture
def trusted_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every hash count as taken long after the file last changed, so fingerprints
    recorded now vouch for the files at once (instead of after RACY_NS of real time)."""
    real = trees.now_ns
    monkeypatch.setattr(trees, "now_ns", lambda: real() + 10 * RACY_NS)


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files and tensor blobs (their sha256) the read check hashes, in
    order."""
    seen: list[str] = []
    real, real_blob = trees.sha256_stream, tensors.hash_blob

    def name(stream: Any) -> str:
        return os.path.basename(os.readlink(f"/proc/self/fd/{stream.fileno()}"))

    def spy(stream: Any) -> str:
        seen.append(name(stream))
        return real(stream)

    def spy_blob(stream: Any, whole: Any = None) -> str:
        seen.append(name(stream))
        return real_blob(stream, whole)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name the files hashed")
    monkeypatch.setattr(trees, "sha256_stream", spy)
    monkeypatch.setattr(tensors, "hash_blob", spy_blob)
    return seen


def tensor_blobs(store: Store, handle: str) -> list[str]:
    """The blobs of a stored module's tensors (named by the manifest's sha256), sorted."""
    return sorted({t.sha256 for t in store.resolve(handle).manifest().tensors.values()})


@pytest.mark.parametrize("rel", [PROGRAM, "assets/labels.txt", "graft.json"])
def test_a_same_size_edit_of_a_small_file_is_caught_on_every_load(
        store: Store, make_module: Callable[..., Path], rel: str, trusted_clock: None) -> None:
    stored = store.add(make_module("tiny"))
    bystander = store.add(make_module("other"))
    store.open("tiny")  # a load that trusts the weights' fingerprint from now on
    if rel == "graft.json":
        tamper(stored.path / rel, lambda d: d.replace(b'"description": ""',
                                                      b'"description": "x"')[:-1])
    else:
        tamper(stored.path / rel, lambda d: bytes([d[0] ^ 1]) + d[1:])
    with pytest.raises(IntegrityError, match=r"damaged.*graft verify tiny@1\.0\.0"):
        store.open("tiny")
    assert store.open("other")[0] == bystander


@pytest.mark.parametrize("how", ["in place", "replaced"])
def test_a_same_size_edit_of_the_weights_is_caught_even_when_trusted(
        store: Store, make_module: Callable[..., Path], tmp_path: Path, how: str,
        trusted_clock: None, hashed: list[str]) -> None:
    stored = store.add(make_module("tiny"))
    store.open("tiny")  # hashes the tensors and records fingerprints that vouch for them
    hashed.clear()
    store.open("tiny")
    assert hashed and not set(tensor_blobs(store, "tiny")) & set(hashed)  # trusted now
    path = store.blob_path(stored.manifest().tensors["extra"].sha256)
    wait_for_a_new_timestamp(tmp_path / "scratch", path.stat().st_ctime_ns)
    if how == "in place":  # same inode, same size, new mtime and ctime
        tamper(path, flip_byte)
    else:  # a new file of the same size renamed over it, mtime set back: the inode differs
        st = path.stat()
        fresh = path.parent / "swap"
        fresh.write_bytes(flip_byte(path.read_bytes()))
        os.utime(fresh, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.chmod(path, 0o644)
        os.replace(fresh, path)
    with pytest.raises(IntegrityError, match="tensor extra does not match its sha256"):
        store.open("tiny")


def test_fresh_weights_are_hashed_until_their_fingerprint_is_old_enough(
        store: Store, make_module: Callable[..., Path], hashed: list[str]) -> None:
    # With the real clock the file changed a moment ago (the add linked it): a tick-mate edit
    # could hide behind the same timestamps, so every read hashes it for RACY_NS.
    store.add(make_module("tiny"))
    for _ in range(3):
        hashed.clear()
        store.open("tiny")
        assert set(tensor_blobs(store, "tiny")) <= set(hashed)


def test_each_load_rehashes_programs_and_assets_but_not_trusted_weights(
        store: Store, make_module: Callable[..., Path], trusted_clock: None,
        hashed: list[str]) -> None:
    stored = store.add(make_module("tiny"))
    store.open("tiny")
    hashed.clear()
    store.open("tiny")
    assert sorted(hashed) == ["forward.eval.json", "labels.txt"]  # all but the tensors
    assert sorted(Manifest.read(stored.path).files) == [
        "assets/labels.txt", PROGRAM, WEIGHTS]
    hashed.clear()
    store.verify("tiny")  # verify never trusts metadata
    assert sorted(hashed) == sorted(["forward.eval.json", "labels.txt",
                                     *tensor_blobs(store, "tiny")])


def test_tensors_shared_with_a_sibling_are_hashed_once_for_both(
        store: Store, make_module: Callable[..., Path], tmp_path: Path, trusted_clock: None,
        hashed: list[str]) -> None:
    # A tensor blob's fingerprint belongs to the blob, not to a module, and adding a module
    # that shares it links nothing to it (its ctime stays): neither module hashes it again.
    weights = weights_bytes("shared")
    store.add(make_module("a", contents={WEIGHTS: weights}))
    store.open("a")
    store.add(make_module("b", contents={WEIGHTS: weights}))
    for handle in ("a", "b"):
        hashed.clear()
        store.open(handle)
        assert sorted(hashed) == ["forward.eval.json", "labels.txt"]  # tensors trusted
    assert tensor_blobs(store, "a") == tensor_blobs(store, "b")
    assert_consistent(store)


def _index_sql(store: Store, sql: str) -> list[Any]:
    with closing(sqlite3.connect(store.root / "index.sqlite")) as conn:
        rows = conn.execute(sql).fetchall()
        conn.commit()
    return rows


def test_a_module_s_blob_fingerprints_are_read_from_its_packed_row(
        store: Store, make_module: Callable[..., Path], trusted_clock: None,
        hashed: list[str]) -> None:
    # One row per module (index table module_checks) holds its blobs' fingerprints: a load
    # reads it instead of a row per tensor. It is a cache of blob_checks, so without that
    # table the packed row alone must vouch; a row that is not well formed vouches for
    # nothing, and is written again.
    store.add(make_module("tiny"))
    store.open("tiny")  # hashes the tensors, records their fingerprints, packs them
    ((checks,),) = _index_sql(store, "SELECT checks FROM module_checks")
    assert len(checks) == 72 * len(tensor_blobs(store, "tiny"))  # sha256 and five integers
    _index_sql(store, "DELETE FROM blob_checks")
    hashed.clear()
    store.open("tiny")
    assert sorted(hashed) == ["forward.eval.json", "labels.txt"]  # the packed row vouched
    _index_sql(store, "UPDATE module_checks SET checks = x'00'")
    hashed.clear()
    store.open("tiny")
    assert set(tensor_blobs(store, "tiny")) <= set(hashed)  # not trusted: hashed again
    hashed.clear()
    store.open("tiny")
    assert sorted(hashed) == ["forward.eval.json", "labels.txt"]  # and packed again
    store.remove("tiny")
    assert _index_sql(store, "SELECT module FROM module_checks") == []


def test_the_loader_trusts_the_packed_row_and_still_catches_an_edit(
        store: Store, make_module: Callable[..., Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same through ``graft.load``, which checks each tensor blob as it reads it."""
    import graft
    from graft.hub import index

    stored = store.add(make_module("tiny"))
    real = index.now_ns
    monkeypatch.setattr(index, "now_ns", lambda: real() + 10 * RACY_NS)
    counted: list[int] = []
    real_hash = tensors.hash_buffer
    monkeypatch.setattr(tensors, "hash_buffer", lambda view: counted.append(1) or real_hash(view))
    graft.load("tiny", store=store)
    assert len(counted) == len(tensor_blobs(store, "tiny"))  # first load: every blob hashed
    _index_sql(store, "DELETE FROM blob_checks")
    for _ in range(2):
        counted.clear()
        graft.load("tiny", store=store)
        assert counted == []  # the packed row vouched for every blob
    path = store.blob_path(stored.manifest().tensors["extra"].sha256)
    wait_for_a_new_timestamp(tmp_path / "scratch", path.stat().st_ctime_ns)
    tamper(path, flip_byte)  # same inode and size; its ctime moves, so the row cannot vouch
    with pytest.raises(IntegrityError, match="tensor extra does not match its sha256"):
        graft.load("tiny", store=store)
