"""The store under stress (graft.hub.index, graft.hub.gc): a lost, corrupt, old or partly
emptied index; a store root that is a file; one broken module among good ones."""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Callable

import pytest

from graft.errors import IntegrityError, ModuleNotFound, StoreError
from graft.hub import index
from graft.hub.store import Store
from tests.hub.conftest import random_bytes
from tests.hub.test_store import (
    HEADER_LINK,
    PROGRAM,
    assert_consistent,
    assert_no_leftovers,
    blob_names,
    snapshot,
    tamper,
)


def three_modules(store: Store, make_module: Callable[..., Path]) -> list:
    shared = random_bytes(1000)
    for name in ("alpha", "beta", "gamma"):
        store.add(make_module(name, contents={"assets/shared.bin": shared}))
    return store.list()


def index_files(store: Store) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name.startswith("index.sqlite"))


def test_a_lost_index_is_rebuilt_from_the_trees(store: Store,
                                                make_module: Callable[..., Path]) -> None:
    before = three_modules(store, make_module)
    blobs = blob_names(store)
    for name in index_files(store):
        (store.root / name).unlink()

    # a writer that would otherwise see an empty index (gc: "nothing is referenced")
    report = store.gc()
    assert (report.blobs_removed, report.trees_removed) == (0, 0)
    after = assert_consistent(store)
    assert [(m.name, m.version, m.digest, m.size) for m in after] == [
        (m.name, m.version, m.digest, m.size) for m in before]
    assert blob_names(store) == blobs
    assert_no_leftovers(store)


def test_a_reader_rebuilds_a_lost_index_too(store: Store,
                                            make_module: Callable[..., Path]) -> None:
    before = three_modules(store, make_module)
    (store.root / "index.sqlite").unlink()
    assert [m.digest for m in store.list()] == [m.digest for m in before]
    assert store.resolve("beta").digest == before[1].digest


@pytest.mark.parametrize("damage", ["garbage", "truncated", "tables dropped"])
def test_a_corrupt_index_is_set_aside_and_rebuilt(store: Store,
                                                  make_module: Callable[..., Path],
                                                  damage: str) -> None:
    before = three_modules(store, make_module)
    path = store.root / "index.sqlite"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file
        if damage == "tables dropped":
            conn.execute("DROP TABLE files")
            conn.commit()
            # into the main file too (a reader this process keeps open means this close is
            # not the last one, which would checkpoint)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    if damage == "garbage":
        path.write_bytes(os.urandom(8192))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1500])
    old = path.read_bytes()

    assert [m.digest for m in store.list()] == [m.digest for m in before]
    assert_consistent(store)
    aside = [p for p in store.root.iterdir()
             if ".damaged-" in p.name and not p.name.endswith(("-wal", "-shm"))]
    assert [p.read_bytes() for p in aside] == [old]
    store.gc()
    assert_no_leftovers(store)


def test_rebuild_revalidates_every_tree(store: Store, make_module: Callable[..., Path]) -> None:
    three_modules(store, make_module)
    beta = store.resolve("beta")
    tamper(beta.path / PROGRAM, lambda d: bytes([d[0] ^ 1]) + d[1:])  # same size
    before = snapshot(store.root)
    (store.root / "index.sqlite").unlink()

    assert [m.name for m in store.list()] == ["alpha", "gamma"]  # beta is not taken back
    with pytest.raises(ModuleNotFound):
        store.resolve("beta")
    assert store.gc().trees_kept == 1
    assert snapshot(store.root) == before  # and nothing of it was deleted


def test_rows_that_vanished_never_get_a_module_collected(
        store: Store, make_module: Callable[..., Path]) -> None:
    before = three_modules(store, make_module)
    with closing(sqlite3.connect(store.root / "index.sqlite")) as conn:
        conn.execute("DELETE FROM files WHERE module = ?", (before[0].digest,))
        conn.execute("DELETE FROM modules WHERE digest = ?", (before[0].digest,))
        conn.commit()
    assert [m.name for m in store.list()] == ["beta", "gamma"]

    report = store.gc()

    assert (report.trees_adopted, report.trees_removed, report.blobs_removed) == (1, 0, 0)
    assert [m.digest for m in assert_consistent(store)] == [m.digest for m in before]
    assert_no_leftovers(store)


def test_an_old_index_is_migrated(store: Store, make_module: Callable[..., Path]) -> None:
    before = three_modules(store, make_module)
    path = store.root / "index.sqlite"
    with closing(sqlite3.connect(path)) as conn:  # what Graft 0.1 wrote: schema 1
        rows = conn.execute("SELECT digest, name, version, created, size, parents "
                            "FROM modules").fetchall()
        files = conn.execute("SELECT module, path, sha256, size FROM files").fetchall()
    path.unlink()
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript("""
            CREATE TABLE modules (digest TEXT PRIMARY KEY, name TEXT NOT NULL,
                version TEXT NOT NULL, created TEXT NOT NULL, size INTEGER NOT NULL,
                parents TEXT NOT NULL, UNIQUE (name, version));
            CREATE TABLE files (module TEXT NOT NULL, path TEXT NOT NULL,
                sha256 TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (module, path));
            PRAGMA user_version = 1;""")
        conn.executemany("INSERT INTO modules VALUES (?, ?, ?, ?, ?, ?)", rows)
        conn.executemany("INSERT INTO files VALUES (?, ?, ?, ?)", files)
        conn.commit()
    assert store.list() == before  # same rows, created times included: migrated, not rebuilt
    assert_consistent(store)
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == index.SCHEMA_VERSION == 5
    # the old index has no tensor rows for these trees, yet gc keeps their tensor blobs
    blobs = blob_names(store)
    assert store.gc().blobs_removed == 0
    assert blob_names(store) == blobs
    assert_consistent(store)


@pytest.mark.parametrize("call", ["list", "resolve", "add", "gc", "contains"])
def test_a_store_root_that_is_a_file_is_a_clear_error(tmp_path: Path,
                                                      make_module: Callable[..., Path],
                                                      call: str) -> None:
    root = tmp_path / "home"
    root.write_text("not a directory")
    store = Store(root)
    with pytest.raises(StoreError, match=r"is a file, not a directory.*GRAFT_HOME"):
        {"list": store.list, "resolve": lambda: store.resolve("tiny"),
         "add": lambda: store.add(make_module()), "gc": store.gc,
         "contains": lambda: "tiny" in store}[call]()
    assert root.read_text() == "not a directory"


def test_one_broken_module_does_not_break_the_listing(store: Store,
                                                      make_module: Callable[..., Path]) -> None:
    three_modules(store, make_module)
    alpha, beta, gamma = store.list()
    (beta.path / HEADER_LINK).unlink()  # a damaged tree: its weights' header is gone
    with closing(sqlite3.connect(store.root / "index.sqlite")) as conn:  # a malformed row
        conn.execute("UPDATE modules SET parents = '{not json' WHERE digest = ?",
                     (gamma.digest,))
        conn.commit()

    listed = store.list(check=True)

    assert [m.name for m in listed] == ["alpha", "beta", "gamma"]
    assert listed[0].damage is None
    assert "header of its weights) is missing" in listed[1].damage
    assert "index row is malformed" in listed[2].damage
    assert store.resolve("alpha").damage is None
    with pytest.raises(IntegrityError):
        store.resolve("beta")


def test_rebuild_index_on_request(store: Store, make_module: Callable[..., Path]) -> None:
    before = three_modules(store, make_module)
    rebuilt = store.rebuild_index()
    assert [m.digest for m in rebuilt] == [m.digest for m in before]
    assert [p for p in index_files(store) if ".damaged-" in p]  # the old one kept aside
    with closing(sqlite3.connect(store.root / "index.sqlite")) as conn:
        assert json.loads(conn.execute("SELECT parents FROM modules LIMIT 1").fetchone()[0]) \
            == []


def test_a_thread_keeps_one_read_connection_until_the_index_is_another_file(
        store: Store, make_module: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """hub/readers.py: reads reuse one read-only connection per thread; a rebuilt index
    (another file), another thread and a forked child each get their own."""
    import threading

    from graft.hub import readers

    store.add(make_module("tiny"))
    opened: list[int] = []
    real = index.reader

    def counting(path: Path, **kwargs: object) -> sqlite3.Connection:
        if kwargs.get("read_only"):
            opened.append(os.getpid())
        return real(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(index, "reader", counting)
    readers.drop()
    for _ in range(3):
        store.resolve("tiny")
    assert len(opened) == 1
    store.rebuild_index()  # the old file is set aside, a new one written
    store.resolve("tiny")
    assert len(opened) == 2
    worker = threading.Thread(target=store.resolve, args=("tiny",))
    worker.start()
    worker.join()
    assert len(opened) == 3
    pid = os.fork()
    if pid == 0:  # the child must open its own, and leave the parent's alone
        try:
            store.resolve("tiny")
            os._exit(0 if opened[-1] == os.getpid() else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.resolve("tiny")
    assert len(opened) == 3  # the parent's connection still serves it
