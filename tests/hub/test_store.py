"""Tests for graft.hub.store: layout, lookups, refusals, gc, concurrent writers (kill points:
test_kill_points.py)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sqlite3
import stat
import time
import traceback
from contextlib import closing
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

import pytest

from graft.errors import (
    FormatError,
    HandleError,
    IntegrityError,
    ModuleNotFound,
    UnsafeContentError,
    VersionConflict,
)
from graft.hub.handles import parse_handle
from graft.hub.store import GcReport, Store, StoredModule
from graft.hub.tensors import HEADER_LINK
from graft.format.entries import Parent
from graft.format.manifest import Manifest
from tests.hub.conftest import program_bytes, random_bytes, weights_bytes

WEIGHTS = "weights.safetensors"
PROGRAM = "programs/forward.eval.json"


# -- helpers -------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[int, str] | None]:
    """Every path under ``root`` with its size and sha256 (None for folders), leaving out the
    index and the lock file (compare ``store.list()`` for the index)."""
    seen: dict[str, tuple[int, str] | None] = {}
    if not root.exists():
        return seen
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel == "lock" or rel.startswith("index.sqlite"):
            continue
        seen[rel] = None if path.is_dir() else (
            path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return seen


def blob(store: Store, sha256: str) -> Path:
    return store.root / "blobs" / "sha256" / sha256[:2] / sha256


def blob_names(store: Store) -> set[str]:
    return {p.name for p in (store.root / "blobs" / "sha256").glob("*/*")}


def header_of(weights: bytes) -> bytes:
    """The first 8 + N bytes of a safetensors file: its header blob."""
    return weights[:8 + int.from_bytes(weights[:8], "little")]


def expected_blobs(modules: list[StoredModule]) -> set[str]:
    """The blobs stored modules need: every file but the weights and reference files, whose
    headers and each tensor (by the manifest's sha256 for the weights) are blobs of their
    own."""
    from graft.hub.tensorfiles import read_record

    names: set[str] = set()
    for m in modules:
        manifest = m.manifest()
        split = read_record(m.path, manifest)  # reference files: header and tensor blobs
        names |= {sha for layout in split.values() for sha, _ in layout.blobs()}
        names |= {e.sha256 for rel, e in manifest.files.items()
                  if rel != WEIGHTS and rel not in split}
        names |= {t.sha256 for t in manifest.tensors.values()}
        names.add(hashlib.sha256((m.path / HEADER_LINK).read_bytes()).hexdigest())
    return names


def tamper(path: Path, change: Callable[[bytes], bytes]) -> None:
    os.chmod(path, 0o644)  # stored files are read-only; a tamperer would not care
    path.write_bytes(change(path.read_bytes()))


def flip_byte(data: bytes) -> bytes:
    return data[:10] + bytes([data[10] ^ 0xFF]) + data[11:]


def assert_consistent(store: Store) -> list[StoredModule]:
    """Every listed module resolves and verifies; (name, version) and digests are unique."""
    modules = store.list()
    assert len({(m.name, m.version) for m in modules}) == len(modules)
    assert len({m.digest for m in modules}) == len(modules)
    for module in modules:
        assert store.resolve(module.pinned_handle) == module
        assert store.verify(module.pinned_handle) == module
    return modules


def assert_no_leftovers(store: Store) -> None:
    """Only indexed trees and referenced blobs remain, and tmp/ is empty."""
    modules = store.list()
    assert sorted(p.name for p in (store.root / "tmp").iterdir()) == []
    assert sorted(p.name for p in (store.root / "modules").iterdir()) == sorted(
        m.digest.removeprefix("sha256:") for m in modules)
    assert blob_names(store) == expected_blobs(modules)


def _context() -> Any:
    # Children are forked from a fresh server process that has imported the store once, not
    # from the test process: separate processes that start in milliseconds, not seconds.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["graft.hub.store", __name__])
    return ctx


# -- adding and resolving ------------------------------------------------------------------


def test_add_then_resolve(store: Store, make_module: Callable[..., Path]) -> None:
    source = make_module("tiny", "1.0.0")
    manifest = Manifest.read(source)
    assert not store.root.exists()

    stored = store.add(source)

    assert (stored.name, stored.version, stored.digest, stored.size) == (
        "tiny", "1.0.0", manifest.digest, manifest.size)
    assert stored.path == store.root / "modules" / manifest.digest.removeprefix("sha256:")
    assert stored.handle == "tiny@1.0.0"
    assert stored.pinned_handle == f"tiny@{manifest.digest}"
    assert datetime.fromisoformat(stored.created).utcoffset() == timedelta(0)
    assert stored.manifest() == manifest
    for rel, entry in manifest.files.items():
        if rel == WEIGHTS:
            continue  # stored as tensor blobs, below
        stored_file = stored.path / rel
        assert stored_file.read_bytes() == (source / rel).read_bytes()
        assert os.path.samefile(stored_file, blob(store, entry.sha256))  # a hard link
        assert stat.S_IMODE(stored_file.stat().st_mode) & 0o222 == 0  # read-only
    # the weights: a header blob (linked from the tree) and one blob per tensor, named by the
    # sha256 the manifest records and holding the tensor's bytes as the file has them
    weights = (source / WEIGHTS).read_bytes()
    header = header_of(weights)
    assert (stored.path / HEADER_LINK).read_bytes() == header
    assert os.path.samefile(stored.path / HEADER_LINK,
                            blob(store, hashlib.sha256(header).hexdigest()))
    data = weights[len(header):]
    for name, info in json.loads(header[8:]).items():
        raw = data[slice(*info["data_offsets"])]
        assert blob(store, manifest.tensors[name].sha256).read_bytes() == raw
        assert stat.S_IMODE(blob(store, manifest.tensors[name].sha256).stat().st_mode) \
            & 0o222 == 0
    assert not (stored.path / WEIGHTS).exists()
    assert sorted(p.relative_to(stored.path).as_posix() for p in stored.path.rglob("*")
                  if p.is_file()) == sorted([*(set(manifest.files) - {WEIGHTS}), HEADER_LINK,
                                             "graft.json"])
    for handle in ("tiny", "tiny@1.0.0", f"tiny@{manifest.digest}", parse_handle("tiny")):
        assert store.resolve(handle) == stored
    assert store.verify("tiny") == stored
    assert store.list() == [stored]
    assert "tiny@1.0.0" in store and "tiny@2.0.0" not in store
    with closing(sqlite3.connect(store.root / "index.sqlite")) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT digest, name, version, created, size, parents "
                            "FROM modules").fetchall() == [
            (stored.digest, "tiny", "1.0.0", stored.created, stored.size, "[]")]
    assert list((store.root / "tmp").iterdir()) == []


def test_add_records_parents(store: Store, make_module: Callable[..., Path]) -> None:
    base = store.add(make_module("base", "1.0.0"))
    parent = Parent(base.handle, base.digest)
    child = store.add(make_module("child", "1.0.0", parents=(parent,)))
    assert child.parents == (parent,)
    assert store.resolve("child").parents == (parent,)


def test_only_listed_files_are_taken(store: Store, make_module: Callable[..., Path]) -> None:
    source = make_module()
    (source / "notes.txt").write_text("not part of the module")
    (source / "programs" / "stray.json").write_text("{}")
    stored = store.add(source)
    assert not (stored.path / "notes.txt").exists()
    assert not (stored.path / "programs" / "stray.json").exists()
    manifest = Manifest.read(source)
    # every file but the weights, plus the weights' header and its tensors
    assert len(blob_names(store)) == len(manifest.files) - 1 + 1 + len(manifest.tensors)


def test_nothing_is_created_before_the_first_write(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAFT_HOME", str(tmp_path / "home"))
    store = Store()
    assert store.root == tmp_path / "home"
    assert store.list() == []
    assert "tiny" not in store
    with pytest.raises(ModuleNotFound):
        store.resolve("tiny")
    with pytest.raises(ModuleNotFound):
        store.remove("tiny@1.0.0")
    assert store.gc() == GcReport(0, 0, 0, 0)
    assert not store.root.exists()


def test_latest_orders_versions_numerically(store: Store,
                                            make_module: Callable[..., Path]) -> None:
    for version in ("1.9.0", "1.10.0", "1.2.0", "1.10.0-rc.1", "0.9", "1.10.0-rc.2"):
        store.add(make_module("tiny", version))
    store.add(make_module("alpha", "3.0.0"))
    assert store.resolve("tiny").version == "1.10.0"
    assert [(m.name, m.version) for m in store.list()] == [
        ("alpha", "3.0.0"), ("tiny", "0.9"), ("tiny", "1.2.0"), ("tiny", "1.9.0"),
        ("tiny", "1.10.0-rc.1"), ("tiny", "1.10.0-rc.2"), ("tiny", "1.10.0")]


def test_equal_versions_tie_by_created(store: Store, make_module: Callable[..., Path]) -> None:
    for name, versions in (("a", ("1.0", "1.0.0")), ("b", ("1.0.0", "1.0"))):
        for version in versions:
            store.add(make_module(name, version))
        assert store.resolve(name).version == versions[-1]  # the later one


def test_add_is_idempotent(store: Store, make_module: Callable[..., Path]) -> None:
    source = make_module()
    first = store.add(source)
    before = snapshot(store.root)
    assert store.add(source) == first
    assert store.add(str(source)) == first
    assert snapshot(store.root) == before
    assert store.list() == [first]


def test_identical_files_share_one_blob(store: Store, make_module: Callable[..., Path]) -> None:
    weights = weights_bytes("shared")
    a = store.add(make_module("a", contents={WEIGHTS: weights}))
    b = store.add(make_module("b", contents={WEIGHTS: weights}))
    assert os.path.samefile(a.path / HEADER_LINK, b.path / HEADER_LINK)
    # one weights header + 2 tensors (weight, bias) + 2 programs + 2 label files
    assert len(blob_names(store)) == 7


def test_version_conflict_changes_nothing(store: Store,
                                          make_module: Callable[..., Path]) -> None:
    first = store.add(make_module("tiny", "1.0.0"))
    other = make_module("tiny", "1.0.0")  # other random bytes: another module
    before, listed = snapshot(store.root), store.list()

    with pytest.raises(VersionConflict) as info:
        store.add(other)

    message = str(info.value)
    assert first.digest in message and Manifest.read(other).digest in message
    assert "new version" in message
    assert isinstance(info.value, FileExistsError)
    assert snapshot(store.root) == before
    assert store.list() == listed
    assert store.verify("tiny@1.0.0") == first


TAMPERINGS = {
    "changed byte": lambda p: tamper(p, flip_byte),
    "truncated": lambda p: tamper(p, lambda d: d[:-1]),
    "grown": lambda p: tamper(p, lambda d: d + b"\0"),
    "missing": lambda p: p.unlink(),
}


@pytest.mark.parametrize("populated", [False, True], ids=["empty store", "populated store"])
@pytest.mark.parametrize("how", sorted(TAMPERINGS))
def test_tampered_source_is_refused(store: Store, make_module: Callable[..., Path], how: str,
                                    populated: bool) -> None:
    if populated:
        store.add(make_module("base"))
    before, listed = snapshot(store.root), store.list()
    source = make_module("tiny")
    TAMPERINGS[how](source / WEIGHTS)

    with pytest.raises(IntegrityError, match=WEIGHTS):
        store.add(source)

    assert store.list() == listed
    assert snapshot(store.root) == before  # no blob, no tree, no tmp entry
    assert store.root.exists() == populated
    if populated:
        assert_consistent(store)


def test_linked_file_is_refused(store: Store, make_module: Callable[..., Path],
                                tmp_path: Path) -> None:
    source = make_module()
    outside = tmp_path / "outside.bin"
    outside.write_bytes((source / WEIGHTS).read_bytes())
    (source / WEIGHTS).unlink()
    (source / WEIGHTS).symlink_to(outside)
    with pytest.raises(UnsafeContentError):
        store.add(source)
    assert not store.root.exists()


def test_not_a_module_is_refused(store: Store, tmp_path: Path) -> None:
    with pytest.raises(ModuleNotFound, match="not a directory"):
        store.add(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModuleNotFound, match="graft.json"):
        store.add(tmp_path / "empty")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "graft.json").write_text("{not json")
    with pytest.raises(FormatError):
        store.add(tmp_path / "garbage")
    assert not store.root.exists()


# -- lookups -------------------------------------------------------------------------------


def test_not_found_says_what_exists(store: Store, make_module: Callable[..., Path]) -> None:
    store.add(make_module("tiny-cnn", "1.0.0"))
    store.add(make_module("tiny-cnn", "1.1.0"))
    other = store.add(make_module("other", "2.0.0"))
    before = snapshot(store.root)

    with pytest.raises(ModuleNotFound, match=r"did you mean tiny-cnn.*graft add DIR.*graft "
                                             r"import NAME") as info:
        store.resolve("tiny-cn")
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(ModuleNotFound, match=r"tiny-cnn@2\.0\.0.*versions 1\.0\.0, 1\.1\.0"):
        store.resolve("tiny-cnn@2.0.0")
    with pytest.raises(ModuleNotFound, match=r"other@2\.0\.0, not a version of 'tiny-cnn'"):
        store.resolve(f"tiny-cnn@{other.digest}")
    with pytest.raises(ModuleNotFound, match="no 'tiny-cnn' module with digest"):
        store.resolve("tiny-cnn@sha256:" + "0" * 64)
    with pytest.raises(ModuleNotFound):
        store.verify("zzz")
    with pytest.raises(HandleError, match="path handle"):
        store.resolve("./tiny-cnn")
    with pytest.raises(HandleError):
        store.resolve("Tiny-CNN")
    assert snapshot(store.root) == before


@pytest.mark.parametrize("damage", ["truncated blob", "missing file", "altered graft.json"])
def test_damaged_store_is_caught_on_read(store: Store, make_module: Callable[..., Path],
                                         damage: str) -> None:
    source = make_module("tiny")
    stored = store.add(source)
    bystander = store.add(make_module("bystander"))
    manifest = Manifest.read(source)
    if damage == "truncated blob":
        tamper(blob(store, manifest.tensors["extra"].sha256), lambda d: d[:100])
    elif damage == "missing file":
        (stored.path / PROGRAM).unlink()
    else:
        tamper(stored.path / "graft.json", lambda d: d.replace(b'"description": ""',
                                                               b'"description": "x"'))

    for call in (store.resolve, store.verify):
        with pytest.raises(IntegrityError, match=r"graft verify tiny@1\.0\.0.*graft add DIR"):
            call("tiny")
    assert store.verify("bystander") == bystander

    assert store.add(source) == stored  # adding it again repairs it
    assert store.verify("tiny") == stored
    assert_consistent(store)


def test_altered_blob_is_caught_by_verify(store: Store,
                                          make_module: Callable[..., Path]) -> None:
    source = make_module("tiny")
    stored = store.add(source)
    tamper(blob(store, Manifest.read(source).tensors["extra"].sha256), flip_byte)

    # same size: the weights' fingerprint (ctime) changed, so reads hash them and see it
    for call in (store.resolve, store.verify):
        with pytest.raises(IntegrityError, match="sha256"):
            call("tiny")

    # a module that shares the altered tensor blob rewrites it from its own checked bytes,
    # which repairs every module made of that tensor
    sibling = store.add(make_module("sibling", contents={WEIGHTS: (source / WEIGHTS)
                                                         .read_bytes()}))
    assert store.verify(sibling.handle) == sibling
    assert store.verify("tiny") == stored
    tamper(blob(store, Manifest.read(source).tensors["extra"].sha256), flip_byte)
    with pytest.raises(IntegrityError):
        store.verify("sibling")
    assert store.add(source) == stored
    assert_consistent(store)


# -- removal, staging and gc ---------------------------------------------------------------


def test_remove_then_gc(store: Store, make_module: Callable[..., Path]) -> None:
    shared = random_bytes(2048)
    alpha_source = make_module("alpha", contents={"assets/shared.bin": shared})
    alpha = store.add(alpha_source)
    beta = store.add(make_module("beta", contents={"assets/shared.bin": shared}))
    blobs_before = blob_names(store)
    # alpha's own blobs (the two share their weights header: same tensor names and shapes)
    own = expected_blobs([alpha]) - expected_blobs([beta])
    own_bytes = sum(blob(store, h).stat().st_size for h in own)
    assert len(own) == 2 + 3  # program, labels; tensors weight, bias, extra

    assert store.remove("alpha@1.0.0") == alpha
    assert not alpha.path.exists()
    with pytest.raises(ModuleNotFound):
        store.resolve("alpha")
    assert blob_names(store) == blobs_before  # blobs wait for gc

    report = store.gc()

    assert report == GcReport(blobs_removed=len(own), bytes_freed=own_bytes,
                              tmp_removed=0, trees_removed=0)
    assert blob(store, hashlib.sha256(shared).hexdigest()).exists()
    assert store.verify("beta") == beta
    assert_no_leftovers(store)
    assert store.gc() == GcReport(0, 0, 0, 0)
    assert store.add(alpha_source).digest == alpha.digest  # and it can come back


def test_remove_refuses_an_ambiguous_name(store: Store,
                                          make_module: Callable[..., Path]) -> None:
    store.add(make_module("tiny", "1.0.0"))
    newer = store.add(make_module("tiny", "1.1.0"))
    before, listed = snapshot(store.root), store.list()

    with pytest.raises(HandleError, match=r"2 stored versions.*tiny@1\.1\.0"):
        store.remove("tiny")
    with pytest.raises(ModuleNotFound):
        store.remove("tiny@9.9.9")
    with pytest.raises(HandleError):
        store.remove("./tiny")

    assert snapshot(store.root) == before and store.list() == listed
    store.remove("tiny@1.0.0")
    assert store.remove("tiny") == newer  # one version left: the bare name is clear
    assert store.list() == []


def test_staging_is_removed_whatever_happens(store: Store,
                                             module_writer: Callable[..., Manifest]) -> None:
    with store.staging() as staging:
        assert staging.parent == store.root / "tmp" and not any(staging.iterdir())
        manifest = module_writer(staging / "m", "saved", "1.0.0",
                                 {WEIGHTS: weights_bytes("saved"), PROGRAM: program_bytes()})
        stored = store.add(staging / "m")
    assert not staging.exists()
    assert list((store.root / "tmp").iterdir()) == []
    assert store.verify("saved").digest == manifest.digest == stored.digest

    with pytest.raises(RuntimeError, match="boom"):
        with store.staging() as staging:
            (staging / "half-written").write_bytes(b"x" * 10)
            raise RuntimeError("boom")
    assert list((store.root / "tmp").iterdir()) == []


def test_gc_removes_leftovers_but_not_live_staging(store: Store,
                                                   make_module: Callable[..., Path]) -> None:
    stored = store.add(make_module())
    tmp = store.root / "tmp"
    (tmp / "add-99999-0123").mkdir()  # a killed writer's work folder
    (tmp / "add-99999-0123" / "part").write_bytes(b"x" * 100)
    (tmp / "stage-99999-4567").mkdir()  # a staging folder whose process is gone
    (tmp / "stage-99999-4567" / "weights").write_bytes(b"y" * 50)
    (tmp / "stage-99999-4567.lock").touch()
    (tmp / "stage-99999-89ab.lock").touch()  # killed before it made its folder
    (tmp / "junk").write_bytes(b"z" * 10)
    os.utime(tmp / "junk", (time.time() - 3600,) * 2)
    (tmp / "fresh").write_bytes(b"w")  # unknown and recent: left alone
    orphan = store.root / "modules" / ("ab" * 32)  # no row, not removed, not a module
    orphan.mkdir()
    (orphan / "graft.json").write_bytes(b"{}")
    stray = blob(store, "cd" * 32)
    stray.parent.mkdir()
    stray.write_bytes(b"v" * 7)

    with store.staging() as live:
        (live / "weights").write_bytes(b"live")
        report = store.gc()
        assert (live / "weights").read_bytes() == b"live"
        assert (tmp / f"{live.name}.lock").exists()

    assert report == GcReport(blobs_removed=1, bytes_freed=100 + 50 + 10 + 7,
                              tmp_removed=4, trees_removed=0, trees_kept=1)
    assert sorted(p.name for p in tmp.iterdir()) == ["fresh"]
    assert (orphan / "graft.json").read_bytes() == b"{}"  # never deleted for lack of a row
    assert store.verify(stored.handle) == stored
    (tmp / "fresh").unlink()
    (orphan / "graft.json").unlink()
    orphan.rmdir()
    assert_no_leftovers(store)


# -- several processes ---------------------------------------------------------------------


def _add_worker(root: str, sources: list[str], barrier: Any, results: Any) -> None:
    try:
        store = Store(root)
        barrier.wait(timeout=60)
        results.put((sources, [store.add(s).digest for s in sources]))
    except BaseException:
        results.put((sources, traceback.format_exc()))


@pytest.mark.timeout(120)
def test_concurrent_writers(store: Store, make_module: Callable[..., Path]) -> None:
    shared = random_bytes(1 << 20)  # every module holds this blob: all writers place it
    sources = {name: str(make_module(name, contents={"assets/shared.bin": shared}))
               for name in ("same", "a", "b", "c", "d", "e", "f")}
    jobs = [["same", "a", "b", "c", "d"], ["same", "d", "c", "e", "f"]]
    ctx = _context()
    barrier, results = ctx.Barrier(len(jobs)), ctx.Queue()
    workers = [ctx.Process(target=_add_worker,
                           args=(str(store.root), [sources[n] for n in job], barrier, results))
               for job in jobs]
    for worker in workers:
        worker.start()
    # meanwhile this process reads (everything listed must be complete) and collects garbage
    while any(w.is_alive() for w in workers):
        assert_consistent(store)
        store.gc()
    outcomes = dict((tuple(k), v) for k, v in (results.get(timeout=60) for _ in workers))
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0

    for outcome in outcomes.values():
        assert isinstance(outcome, list), outcome  # a traceback otherwise
    digests = {name: Manifest.read(Path(path)).digest for name, path in sources.items()}
    names = {path: name for name, path in sources.items()}
    for job, outcome in outcomes.items():
        assert outcome == [digests[names[path]] for path in job]
    modules = assert_consistent(store)
    assert sorted(m.name for m in modules) == sorted(sources)
    store.gc()
    assert_no_leftovers(store)
