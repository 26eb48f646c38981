"""The store's root: its layout, its modules' index entries, and the index itself (read
connections, and the writer lock that creates, migrates and rebuilds it). ``Store`` builds
its public operations on this (hub/reading.py, hub/store.py)."""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from graft.errors import GraftError, HandleError, StoreError
from graft.format.entries import Parent
from graft.format.manifest import Manifest
from graft.hub import index, leases, readers, staging
from graft.hub.gc import TREE_NAME, adopt
from graft.hub.lookup import hex_of
from graft.settings import graft_home

__all__ = ["StoreRoot", "StoredModule"]

_T = TypeVar("_T")

_LOCK_TIMEOUT = 600.0  # seconds a writer waits for another writer before giving up


@dataclass(frozen=True)
class StoredModule:
    """One module in the local store.

    Args:
        name: The module name.
        version: The module version.
        digest: ``sha256:<hex>`` of its canonical manifest.
        path: Its module tree in the store. Not a module directory: its weights and reference
            files are tensor blobs (docs/store.md); :meth:`Store.export` writes one out.
        created: When it was added, UTC ISO 8601.
        size: Total bytes of its files.
        parents: The modules it was derived from.
        damage: Why its tree is damaged, when :meth:`Store.list` was asked to check.
    """

    name: str
    version: str
    digest: str
    path: Path
    created: str
    size: int
    parents: tuple[Parent, ...] = ()
    damage: str | None = None
    lease: leases.Lease | None = field(default=None, compare=False, repr=False)
    # the tensor blobs' recorded fingerprints, when open() left their check to read_tensors,
    # and whether read_tensors is to rewrite the module's packed fingerprints (index.py)
    deferred: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    repack: bool = field(default=False, compare=False, repr=False)

    @property
    def handle(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    @property
    def pinned_handle(self) -> str:
        """``name@sha256:<hex>``: names exactly this module forever."""
        return f"{self.name}@{self.digest}"

    def manifest(self) -> Manifest:
        """Read the module's ``graft.json``."""
        return Manifest.read(self.path)


class StoreRoot:
    """A store's folder and index (see ``Store``, which adds the operations).

    Args:
        root: Its directory; default ``graft.settings.graft_home()``. Nothing is created until
            the first write.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = (Path(root).expanduser() if root is not None else graft_home()).absolute()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    # -- layout ----------------------------------------------------------------------------

    _blobs = property(lambda self: self.root / "blobs" / "sha256")
    _modules = property(lambda self: self.root / "modules")
    _tmp = property(lambda self: self.root / "tmp")
    _leases = property(lambda self: self.root / "leases")
    _index = property(lambda self: self.root / "index.sqlite")

    def blob_path(self, sha256: str) -> Path:
        """Where the blob with this hex sha256 lives (whether or not it exists)."""
        return self._blobs / sha256[:2] / sha256

    def blob_file(self, sha256: str) -> str:
        """:meth:`blob_path` as a string, built without pathlib (for the per-tensor loops of
        every load)."""
        root = self.__dict__.get("_blob_root")
        if root is None:
            root = self.__dict__["_blob_root"] = str(self._blobs)
        return f"{root}/{sha256[:2]}/{sha256}"

    def module_path(self, digest: str) -> Path:
        """Where the tree of the module with this ``sha256:<hex>`` digest lives."""
        return self._modules / hex_of(digest)

    # -- internals: the index --------------------------------------------------------------

    def _check_root(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"the local store {self.root} is a file, not a directory; point "
                             "GRAFT_HOME at a directory (it is created on first use)")

    def _has_trees(self) -> bool:
        return any(TREE_NAME.fullmatch(t.name) for t in staging.entries(self._modules))

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Run one query on the index (see :meth:`_reading`)."""
        return self._reading(lambda query: query(sql, params))

    def _reading(self, work: Callable[[Callable[..., list[Any]]], _T]) -> _T:
        """Run ``work(query)`` on one read connection to the index. An absent index is empty
        unless trees exist (then it is rebuilt); a damaged one is rebuilt."""
        self._check_root()
        if not self._index.exists() and not self._has_trees():
            return work(lambda sql, params=(): [])
        for attempt in (1, 2):
            try:
                conn = readers.reader(self._index)  # kept between reads (hub/readers.py)
                return work(lambda sql, params=(): conn.execute(sql, params).fetchall())
            except sqlite3.Error as exc:
                readers.drop()
                if attempt == 2:
                    raise StoreError(f"cannot read the store index {self._index}: {exc}; run "
                                     "`graft gc` with write access to the store to rebuild "
                                     "it") from None
            with self._writer():  # creates, migrates or rebuilds the index under the lock
                pass
        raise AssertionError("unreachable")

    def _make_dirs(self) -> None:
        self._check_root()
        try:
            for folder in (self._blobs, self._modules, self._tmp, self._leases):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the local store at {self.root}: {exc}; set "
                             "GRAFT_HOME to a writable directory") from None

    @contextmanager
    def _writer(self, *, rebuild: bool = False) -> Iterator[sqlite3.Connection]:
        """Hold the writer lock and an open index: created on first use, migrated, and
        rebuilt from the trees when it is missing (while trees exist) or damaged."""
        from filelock import FileLock, Timeout  # readers never lock: keep `graft list` quick

        self._make_dirs()
        lock = FileLock(str(self.root / "lock"), timeout=_LOCK_TIMEOUT)
        try:
            lock.acquire()
        except Timeout:
            raise StoreError(f"another graft process has held the lock of the local store at "
                             f"{self.root} for {_LOCK_TIMEOUT:.0f} s; wait for it to finish, "
                             "or stop it") from None
        try:
            lost = not self._index.exists() and self._has_trees()
            if lost:
                for suffix in ("-wal", "-shm"):  # a stale log must not replay into a new file
                    self._index.with_name(self._index.name + suffix).unlink(missing_ok=True)
            try:
                if rebuild and self._index.exists():
                    index.set_aside(self._index)
                    lost = True
                conn = index.connect(self._index)
            except sqlite3.Error as exc:
                if not index.is_corruption(exc):
                    raise StoreError(f"cannot open the store index {self._index}: {exc}") \
                        from None
                index.set_aside(self._index)
                lost = True
                conn = index.connect(self._index)
            with closing(conn):
                try:
                    if lost:
                        for tree in staging.entries(self._modules):
                            adopt(self, conn, tree)
                    yield conn
                except sqlite3.Error as exc:
                    raise StoreError(f"cannot write the store index {self._index}: {exc}; if "
                                     "it is damaged, Store.rebuild_index() rebuilds it from "
                                     "the module trees") from None
                _checkpoint(conn)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot rebuild the store index {self._index}: {exc}") from None
        finally:
            lock.release()

    def _stored(self, row: sqlite3.Row) -> StoredModule:
        """An index row as a StoredModule; a row that does not parse is one marked damaged."""
        try:
            parents = tuple(Parent(p["handle"], p["digest"]) for p in json.loads(row["parents"]))
            damage = None
        except (ValueError, TypeError, KeyError, GraftError) as exc:
            parents, damage = (), f"its index row is malformed ({exc})"
        try:
            path = self.module_path(row["digest"])
        except HandleError as exc:
            path, damage = self._modules / "?", f"its index row is malformed ({exc})"
        return StoredModule(name=str(row["name"]), version=str(row["version"]),
                            digest=str(row["digest"]), path=path, created=str(row["created"]),
                            size=row["size"] if isinstance(row["size"], int) else 0,
                            parents=parents, damage=damage)


def _checkpoint(conn: sqlite3.Connection) -> None:
    """Move what a writer committed from the WAL into the index file and empty the WAL.

    SQLite does this itself when the last connection closes, but readers keep theirs open
    (hub/readers.py), so a writer would otherwise leave a WAL as large as its writes behind.
    Best effort: a reader in the middle of a query makes it wait, at most the busy timeout.
    """
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    except sqlite3.Error:
        pass
