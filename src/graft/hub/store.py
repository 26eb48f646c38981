"""The local store: the embedded default hub.

Layout under the root (``$GRAFT_HOME``, default ``~/.cache/graft``)::

    blobs/sha256/<2 hex>/<hex>   content-addressed file blobs, read-only
    modules/<digest hex>/        one tree per module: its files (hard links to the blobs, or
                                 copies where links fail) and its graft.json; the loader opens
                                 it as an ordinary module directory
    index.sqlite                 which modules are stored (SQLite, WAL mode)
    tmp/                         staging, on the same filesystem so renames are atomic
    lock                         held by every writer

Writers take the lock and publish in an order that keeps every state a reader can reach
complete: blobs first (temp file, fsync, rename), then the module tree (one rename), then the
index row, in one transaction. Removal runs the other way round: index row first. Readers never
lock: a module is reachable only through its index row, and they check its tree cheaply on
every read (verify-on-read).
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import sqlite3
import stat
import sys
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from graft.errors import (
    FormatError,
    HandleError,
    IntegrityError,
    ModuleNotFound,
    StoreError,
    VersionConflict,
)
from graft._sqlite import transaction
from graft.hub.handles import Handle, parse_handle
from graft.format.validate import check_module
from graft._fs import sha256_file
from graft.format.manifest import MANIFEST_NAME, FileEntry, Manifest, Parent
from graft.settings import graft_home

try:
    import fcntl
except ImportError:  # Windows: staging directories are then reaped by age only
    fcntl = None  # type: ignore[assignment]

__all__ = ["GcReport", "Store", "StoredModule"]

_CHUNK = 4 << 20
_LOCK_TIMEOUT = 600.0  # seconds a writer waits for another writer before giving up
_BUSY_TIMEOUT = 60.0  # seconds SQLite waits on a busy database
_STALE_AFTER = 600.0  # seconds after which an unrecognised tmp entry counts as abandoned
_ADD_PREFIX = "add-"  # tmp entries created under the writer lock
_STAGE_PREFIX = "stage-"  # tmp entries handed out by Store.staging(), each with a .lock file
_HOW_TO_ADD = ("add one with `graft add DIR` (a module directory) or `graft import NAME` "
               "(a pretrained importer)")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS modules (
    digest  TEXT PRIMARY KEY,   -- 'sha256:<hex>' of the canonical manifest
    name    TEXT NOT NULL,
    version TEXT NOT NULL,
    created TEXT NOT NULL,      -- UTC, ISO 8601
    size    INTEGER NOT NULL,   -- bytes of the module's files
    parents TEXT NOT NULL,      -- JSON list of {"handle", "digest"}
    UNIQUE (name, version)
);
CREATE TABLE IF NOT EXISTS files (
    module TEXT NOT NULL,       -- modules.digest
    path   TEXT NOT NULL,
    sha256 TEXT NOT NULL,       -- the blob
    size   INTEGER NOT NULL,
    PRIMARY KEY (module, path)
);
CREATE INDEX IF NOT EXISTS files_by_sha256 ON files (sha256);
"""
_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class StoredModule:
    """One module in the local store.

    Args:
        name: The module name.
        version: The module version.
        digest: ``sha256:<hex>`` of its canonical manifest.
        path: Its module tree, a directory the loader opens like any module directory.
        created: When it was added, UTC ISO 8601.
        size: Total bytes of its files.
        parents: The modules it was derived from.
    """

    name: str
    version: str
    digest: str
    path: Path
    created: str
    size: int
    parents: tuple[Parent, ...] = ()

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


@dataclass(frozen=True)
class GcReport:
    """What :meth:`Store.gc` removed.

    Args:
        blobs_removed: Blobs that no indexed module referenced.
        bytes_freed: Bytes given back to the filesystem (last links only).
        tmp_removed: Abandoned entries of ``tmp/``.
        trees_removed: Module trees without an index row (left by an interrupted add).
    """

    blobs_removed: int
    bytes_freed: int
    tmp_removed: int
    trees_removed: int = 0


class Store:
    """The local module store.

    Args:
        root: Its directory; default ``graft.settings.graft_home()``. Nothing is created until
            the first write.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = (Path(root).expanduser() if root is not None else graft_home()).absolute()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- layout ----------------------------------------------------------------------------

    @property
    def _blobs(self) -> Path:
        return self.root / "blobs" / "sha256"

    @property
    def _modules(self) -> Path:
        return self.root / "modules"

    @property
    def _tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def _index(self) -> Path:
        return self.root / "index.sqlite"

    def blob_path(self, sha256: str) -> Path:
        """Where the blob with this hex sha256 lives (whether or not it exists)."""
        return self._blobs / sha256[:2] / sha256

    def module_path(self, digest: str) -> Path:
        """Where the tree of the module with this ``sha256:<hex>`` digest lives."""
        return self._modules / _hex_of(digest)

    # -- writing ---------------------------------------------------------------------------

    def add(self, directory: str | os.PathLike[str]) -> StoredModule:
        """Copy a module directory into the store.

        Every file is checked against the manifest (size and sha256) before anything is
        written. Adding a module that is already stored returns the stored entry, and repairs
        the stored copy first if it was damaged.

        Args:
            directory: A module directory (holding ``graft.json``). Only ``graft.json`` and the
                files its manifest lists are taken.

        Returns:
            The stored module.

        Raises:
            ModuleNotFound: ``directory`` is not a module directory.
            IntegrityError: a file is missing, truncated or altered.
            UnsafeContentError: a listed file is a link, escapes the directory, or is code or
                a pickle.
            VersionConflict: another module is stored under the same name and version.
        """
        source = Path(directory).expanduser()
        if not source.is_dir():
            raise ModuleNotFound(f"add: {str(source)!r} is not a directory; pass a module "
                                 f"directory (one holding {MANIFEST_NAME})")
        manifest = Manifest.read(source)
        if MANIFEST_NAME in manifest.files:
            raise FormatError(f"{source / MANIFEST_NAME} lists {MANIFEST_NAME} among its own "
                              "files; the manifest cannot record its own digest")
        # Every byte is checked, and code or pickles are refused, before anything is written:
        # a module in the store needs neither check again when it is loaded.
        check_module(source, manifest, hash_contents=True)
        with self._writer() as conn:
            row = _fetch_one(conn, "SELECT * FROM modules WHERE digest = ?", (manifest.digest,))
            if row is not None:
                stored = self._stored(row)
                if self._damage(stored, hash_contents=True)[0] is None:
                    return stored
                return self._install(source, manifest, conn, repairing=stored)
            clash = _fetch_one(conn, "SELECT * FROM modules WHERE name = ? AND version = ?",
                               (manifest.name, manifest.version))
            if clash is not None:
                raise VersionConflict(_conflict_message(manifest, clash["digest"]))
            return self._install(source, manifest, conn)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh empty directory inside the store's ``tmp/``, removed on exit.

        Write a module there, then :meth:`add` it. :meth:`gc`, from any process, leaves the
        directory alone for as long as this context is open, and reaps it if the process dies.
        """
        self._make_dirs()
        name = f"{_STAGE_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        lock = self._tmp / f"{name}.lock"
        fd = _hold(lock)
        entry = self._tmp / name
        try:
            entry.mkdir()
            yield entry
        finally:
            _rmtree(entry)
            lock.unlink(missing_ok=True)  # still held: a gc cannot be reaping it now
            os.close(fd)

    def remove(self, handle: str | Handle) -> StoredModule:
        """Remove a module from the index and delete its tree; its blobs stay until :meth:`gc`.

        Args:
            handle: ``name@version`` or ``name@sha256:<hex>``; a bare ``name`` only when a
                single version of it is stored.

        Raises:
            ModuleNotFound: no such module is stored.
            HandleError: a bare name matches several versions.
        """
        wanted = _store_handle(handle, "remove")
        self._find(wanted, exact=True)  # fail before creating anything
        with self._writer() as conn:
            stored = self._find(wanted, exact=True, conn=conn)
            with transaction(conn):
                conn.execute("DELETE FROM files WHERE module = ?", (stored.digest,))
                conn.execute("DELETE FROM modules WHERE digest = ?", (stored.digest,))
            if stored.path.exists():
                self._discard(stored.path)
        return stored

    def gc(self) -> GcReport:
        """Delete what no indexed module needs: unreferenced blobs, module trees without an
        index row, and ``tmp/`` entries whose writer is gone.

        A staging directory stays while the process that opened it still holds it, and
        whatever a concurrent :meth:`add` writes is safe, since gc waits for the writer lock.
        """
        if not self._index.exists():
            return GcReport(0, 0, 0, 0)
        with self._writer() as conn:
            indexed = {_hex_of(r["digest"]) for r in conn.execute("SELECT digest FROM modules")}
            referenced = {r["sha256"] for r in conn.execute("SELECT DISTINCT sha256 FROM files")}
            freed = trees = tmp = blobs = 0
            for tree in _entries(self._modules):
                if tree.name not in indexed:
                    freed += _remove(tree)
                    trees += 1
            for entry in _entries(self._tmp):
                reaped, size = self._reap_tmp(entry)
                tmp += reaped
                freed += size
            for fan in _entries(self._blobs):
                for blob in _entries(fan):
                    if blob.name not in referenced:
                        freed += _remove(blob)
                        blobs += 1
                with _suppress_os_error():
                    fan.rmdir()  # only succeeds once the fan-out folder is empty
        return GcReport(blobs_removed=blobs, bytes_freed=freed, tmp_removed=tmp,
                        trees_removed=trees)

    # -- reading ---------------------------------------------------------------------------

    def resolve(self, handle: str | Handle) -> StoredModule:
        """Find a stored module and check its tree cheaply (every file there with its
        recorded size; graft.json's digest equal to the index's).

        Args:
            handle: ``name`` (the latest version: highest release numbers, ties broken by
                the most recently added), ``name@version`` or ``name@sha256:<hex>``.

        Raises:
            ModuleNotFound: no such module is stored; the message lists what is.
            IntegrityError: the stored copy is damaged.
        """
        return self.open(handle)[0]

    def open(self, handle: str | Handle) -> tuple[StoredModule, Manifest]:
        """Like :meth:`resolve`, and also return the manifest the check read (the loader
        needs it, and reading it once is what keeps ``graft.load`` fast)."""
        stored = self._find(_store_handle(handle, "resolve"))
        return stored, self._check(stored, hash_contents=False)

    def verify(self, handle: str | Handle) -> StoredModule:
        """Like :meth:`resolve`, but hash every file against the manifest.

        Raises:
            ModuleNotFound: no such module is stored.
            IntegrityError: a stored file was altered, truncated or lost.
        """
        stored = self._find(_store_handle(handle, "verify"))
        self._check(stored, hash_contents=True)
        return stored

    def list(self) -> list[StoredModule]:
        """Every stored module, sorted by name, then version (numerically)."""
        rows = self._read("SELECT * FROM modules")
        return sorted((self._stored(r) for r in rows),
                      key=lambda m: (m.name, _version_key(m.version), m.created))

    def __contains__(self, handle: object) -> bool:
        """Whether a store handle names an indexed module (no check of its files)."""
        try:
            self._find(_store_handle(handle, "contains"))  # type: ignore[arg-type]
        except (ModuleNotFound, HandleError):
            return False
        return True

    # -- internals: lookup -----------------------------------------------------------------

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Run a query on the index without creating anything; an absent index is empty."""
        if not self._index.exists():
            return []
        try:
            conn = sqlite3.connect(self._index.as_uri() + "?mode=rw", uri=True,
                                   timeout=_BUSY_TIMEOUT)
        except sqlite3.OperationalError:
            return []
        with closing(conn):
            conn.row_factory = sqlite3.Row
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):  # a writer is creating the index right now
                    return []
                raise StoreError(f"cannot read the store index {self._index}: {exc}") from None

    def _stored(self, row: sqlite3.Row) -> StoredModule:
        parents = tuple(Parent(p["handle"], p["digest"]) for p in json.loads(row["parents"]))
        return StoredModule(name=row["name"], version=row["version"], digest=row["digest"],
                            path=self.module_path(row["digest"]), created=row["created"],
                            size=row["size"], parents=parents)

    def _find(self, handle: Handle, *, exact: bool = False,
              conn: sqlite3.Connection | None = None) -> StoredModule:
        """The indexed module a store handle names.

        Args:
            exact: Refuse a bare name that matches several versions (for destructive calls).
        """
        query = "SELECT * FROM modules WHERE name = ?"
        rows = (conn.execute(query, (handle.name,)).fetchall() if conn is not None
                else self._read(query, (handle.name,)))
        found = [self._stored(r) for r in rows]
        found.sort(key=lambda m: (_version_key(m.version), m.created))
        versions = ", ".join(m.version for m in found)
        if not found:
            query = "SELECT DISTINCT name FROM modules"
            names = [r["name"] for r in (conn.execute(query).fetchall() if conn is not None
                                         else self._read(query))]
            close = difflib.get_close_matches(str(handle.name), names, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ModuleNotFound(f"no module named {handle.name!r} in the local store at "
                                 f"{self.root}{hint}; {_HOW_TO_ADD}")
        if handle.digest is not None:
            for module in found:
                if module.digest == handle.digest:
                    return module
            query = "SELECT name, version FROM modules WHERE digest = ?"
            other = (conn.execute(query, (handle.digest,)).fetchall() if conn is not None
                     else self._read(query, (handle.digest,)))
            if other:
                raise ModuleNotFound(f"{handle.digest} is {other[0]['name']}@"
                                     f"{other[0]['version']}, not a version of {handle.name!r}; "
                                     f"use {other[0]['name']}@{handle.digest}")
            raise ModuleNotFound(f"no {handle.name!r} module with digest {handle.digest} in the "
                                 f"local store at {self.root}; it holds versions {versions}. "
                                 f"Use one of those, or {_HOW_TO_ADD}")
        if handle.version is not None:
            for module in found:
                if module.version == handle.version:
                    return module
            raise ModuleNotFound(f"{handle.name}@{handle.version} is not in the local store at "
                                 f"{self.root}; it holds {handle.name} versions {versions}. "
                                 f"Use one of those, or {_HOW_TO_ADD}")
        if exact and len(found) > 1:
            raise HandleError(f"handle {handle.name!r} matches {len(found)} stored versions "
                              f"({versions}); name the one you mean, e.g. "
                              f"'{handle.name}@{found[-1].version}'")
        return found[-1]

    def _damage(self, stored: StoredModule, *,
                hash_contents: bool) -> tuple[str | None, Manifest | None]:
        """Why the stored tree does not match its index row (None when it does), and the
        manifest read on the way."""
        try:
            manifest = Manifest.read(stored.path)
            if manifest.digest != stored.digest:
                return (f"its {MANIFEST_NAME} has digest {manifest.digest}, but the index "
                        f"records {stored.digest}"), None
            manifest.verify_files(stored.path, hash_contents=hash_contents)
        except (FileNotFoundError, FormatError, IntegrityError, NotADirectoryError) as exc:
            return str(exc), None
        return None, manifest

    def _check(self, stored: StoredModule, *, hash_contents: bool) -> Manifest:
        damage, manifest = self._damage(stored, hash_contents=hash_contents)
        if damage is None and manifest is not None:
            return manifest
        if not self._read("SELECT 1 FROM modules WHERE digest = ?", (stored.digest,)):
            raise ModuleNotFound(f"{stored.handle} was removed from the local store at "
                                 f"{self.root} while being read; {_HOW_TO_ADD}")
        raise IntegrityError(f"stored module {stored.handle} ({stored.digest}) at {stored.path} "
                             f"is damaged: {damage}. Run `graft verify {stored.handle}` for a "
                             "full check, and add the module again from its source "
                             "(`graft add DIR` or `graft import NAME`) to repair it")

    # -- internals: writing ----------------------------------------------------------------

    def _make_dirs(self) -> None:
        try:
            for folder in (self._blobs, self._modules, self._tmp):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the local store at {self.root}: {exc}; set "
                             "GRAFT_HOME to a writable directory") from None

    @contextmanager
    def _writer(self) -> Iterator[sqlite3.Connection]:
        """Hold the writer lock and an open index (created on first use)."""
        self._make_dirs()
        lock = FileLock(str(self.root / "lock"), timeout=_LOCK_TIMEOUT)
        try:
            lock.acquire()
        except Timeout:
            raise StoreError(f"another graft process has held the lock of the local store at "
                             f"{self.root} for {_LOCK_TIMEOUT:.0f} s; wait for it to finish, "
                             "or stop it") from None
        try:
            conn = sqlite3.connect(self._index, timeout=_BUSY_TIMEOUT, isolation_level=None)
            with closing(conn):
                conn.row_factory = sqlite3.Row
                try:
                    if conn.execute("PRAGMA user_version").fetchone()[0] < _SCHEMA_VERSION:
                        conn.execute("PRAGMA journal_mode = WAL")
                        conn.executescript(_SCHEMA)
                        conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                    yield conn
                except sqlite3.Error as exc:
                    raise StoreError(f"cannot write the store index {self._index}: "
                                     f"{exc}") from None
        finally:
            lock.release()

    def _new_tmp(self, prefix: str) -> Path:
        path = self._tmp / f"{prefix}{os.getpid()}-{secrets.token_hex(8)}"
        path.mkdir()
        return path

    def _install(self, source: Path, manifest: Manifest, conn: sqlite3.Connection, *,
                 repairing: StoredModule | None = None) -> StoredModule:
        """Write blobs and the module tree, then the index row.

        When ``repairing`` an indexed module, damaged blobs and the tree are rewritten and the
        row stays. On failure, what this call created is taken back. The caller holds the
        writer lock.
        """
        work = self._new_tmp(_ADD_PREFIX)
        target = self.module_path(manifest.digest)
        new_blobs: list[Path] = []
        published = False
        try:
            placed: set[str] = set()
            for rel, entry in manifest.files.items():
                if entry.sha256 not in placed:
                    if self._place_blob(source / rel, rel, entry, work):
                        new_blobs.append(self.blob_path(entry.sha256))
                    placed.add(entry.sha256)
            tree = work / "tree"
            tree.mkdir()
            for rel, entry in manifest.files.items():
                dest = tree / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(self.blob_path(entry.sha256), dest)
            manifest.write(tree)
            _fsync_dirs(tree)
            if target.exists():
                # a tree without an index row (left by a killed add), or one being repaired
                os.replace(target, work / "previous")
            _publish(tree, target)
            published = True
            if repairing is not None:
                return repairing
            created = datetime.now(timezone.utc).isoformat(timespec="microseconds")
            with transaction(conn):
                _insert_rows(conn, manifest, created)
            return StoredModule(name=manifest.name, version=manifest.version,
                                digest=manifest.digest, path=target, created=created,
                                size=manifest.size, parents=tuple(manifest.parents))
        except BaseException:
            if published and repairing is None:
                with _suppress_os_error():
                    os.replace(target, work / "failed")
            for blob in new_blobs:
                blob.unlink(missing_ok=True)
            raise
        finally:
            _rmtree(work)

    def _place_blob(self, source: Path, rel: str, entry: FileEntry, work: Path) -> bool:
        """Make sure the blob of ``entry`` is stored intact; True when this call created it."""
        blob = self.blob_path(entry.sha256)
        try:
            size = blob.stat().st_size
        except FileNotFoundError:
            size = None
        if size == entry.size and sha256_file(blob) == entry.sha256:
            return False
        blob.parent.mkdir(parents=True, exist_ok=True)
        part = work / f"{entry.sha256}.part"
        _copy_checked(source, part, rel, entry)
        _publish(part, blob)
        return size is None

    def _discard(self, path: Path) -> None:
        """Take a tree out of sight in one rename, then delete it."""
        work = self._new_tmp(_ADD_PREFIX)
        try:
            os.replace(path, work / "discarded")
        finally:
            _rmtree(work)

    def _reap_tmp(self, entry: Path) -> tuple[int, int]:
        """Remove one tmp entry if its writer is gone: (entries removed, bytes freed)."""
        name = entry.name
        if name.startswith(_ADD_PREFIX):
            # created only under the writer lock, which gc holds: its writer died
            return 1, _remove(entry)
        if name.startswith(_STAGE_PREFIX):
            if name.endswith(".lock"):
                if (self._tmp / name.removesuffix(".lock")).exists():
                    return 0, 0  # judged with its directory
                lock, directory = entry, None
            else:
                lock, directory = self._tmp / f"{name}.lock", entry
            return _reap_staging(lock, directory)
        try:
            age = time.time() - entry.lstat().st_mtime
        except FileNotFoundError:
            return 0, 0
        if age > _STALE_AFTER:
            return 1, _remove(entry)
        return 0, 0


# -- helpers -------------------------------------------------------------------------------


def _hex_of(digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
        raise HandleError(f"digest {digest!r} is malformed; expected 'sha256:<64 hex>'")
    return hexdigest


def _store_handle(handle: str | Handle, action: str) -> Handle:
    parsed = parse_handle(handle)
    if parsed.kind != "store":
        raise HandleError(f"{action}: {str(handle)!r} is a {parsed.kind} handle; the local store "
                          "takes 'name', 'name@version' or 'name@sha256:<hex>' (open a module "
                          "directory with graft.load(path), add one with Store.add(path))")
    return parsed


def _version_key(version: str) -> tuple[Any, ...]:
    """Order versions by release numbers (1.10.0 > 1.9.0); a -prerelease comes before its
    release; +build metadata does not count."""
    match = re.match(r"^(\d+(?:\.\d+)*)(-[0-9A-Za-z.-]+)?", version)
    if match is None:
        return ((), (0, ()))
    release = tuple(int(p) for p in match.group(1).split("."))
    release += (0,) * max(0, 3 - len(release))
    if match.group(2):
        parts = match.group(2)[1:].split(".")
        pre = (0, tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts))
    else:
        pre = (1, ())
    return (release, pre)


def _conflict_message(manifest: Manifest, stored_digest: str) -> str:
    return (f"{manifest.name}@{manifest.version} is already in the store as {stored_digest}, "
            f"and the module being added ({manifest.digest}) differs from it; give the new "
            f"module a new version (e.g. bump it in {MANIFEST_NAME} when saving), or remove the "
            f"stored one first with `graft rm {manifest.name}@{manifest.version}`")


def _insert_rows(conn: sqlite3.Connection, manifest: Manifest, created: str) -> None:
    parents = json.dumps([{"handle": p.handle, "digest": p.digest} for p in manifest.parents])
    try:
        conn.execute("INSERT INTO modules (digest, name, version, created, size, parents) "
                     "VALUES (?, ?, ?, ?, ?, ?)",
                     (manifest.digest, manifest.name, manifest.version, created, manifest.size,
                      parents))
    except sqlite3.IntegrityError:
        row = _fetch_one(conn, "SELECT digest FROM modules WHERE name = ? AND version = ?",
                         (manifest.name, manifest.version))
        raise VersionConflict(_conflict_message(manifest, row["digest"] if row else "?")) \
            from None
    conn.executemany("INSERT INTO files (module, path, sha256, size) VALUES (?, ?, ?, ?)",
                     [(manifest.digest, rel, e.sha256, e.size)
                      for rel, e in manifest.files.items()])



def _fetch_one(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> Any:
    return conn.execute(sql, params).fetchone()



def _copy_checked(source: Path, dest: Path, rel: str, entry: FileEntry) -> None:
    """Copy ``source`` to a new file ``dest``, hashing on the way, fsync it and make it
    read-only; refuse if the bytes differ from ``entry`` (the source changed since it was
    verified)."""
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as src, open(dest, "xb") as out:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if size != entry.size or digest.hexdigest() != entry.sha256:
        raise IntegrityError(f"{rel} changed while it was being added ({size} bytes now, "
                             f"{entry.size} in the manifest); finish writing the module, then "
                             "add it again")
    os.chmod(dest, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def _link_or_copy(blob: Path, dest: Path) -> None:
    try:
        os.link(blob, dest)
    except OSError:  # no hard links here (or too many): a copy does the same job
        shutil.copyfile(blob, dest)
        with open(dest, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(dest, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def _publish(source: Path, dest: Path) -> None:
    """Atomically move a finished file or tree into place and make the rename durable."""
    os.replace(source, dest)
    _fsync_dir(dest.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_dirs(root: Path) -> None:
    for folder, _, _ in os.walk(root):
        _fsync_dir(Path(folder))


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except FileNotFoundError:
        return []


def _remove(path: Path) -> int:
    """Delete a file or tree; return the bytes this gives back (files with no other link)."""
    freed = 0
    try:
        if path.is_dir() and not path.is_symlink():
            for folder, _, files in os.walk(path):
                for name in files:
                    with _suppress_os_error():
                        st = os.lstat(os.path.join(folder, name))
                        freed += st.st_size if st.st_nlink == 1 else 0
            _rmtree(path)
        else:
            st = path.lstat()
            path.unlink()
            freed = st.st_size if st.st_nlink == 1 else 0
    except FileNotFoundError:
        return 0
    return freed


def _rmtree(path: Path) -> None:
    def retry_writable(function: Any, name: str, _: Any) -> None:
        # read-only files refuse deletion on some platforms
        with _suppress_os_error():
            os.chmod(name, stat.S_IWRITE | stat.S_IREAD)
            function(name)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry_writable)
    else:
        shutil.rmtree(path, onerror=retry_writable)


@contextmanager
def _suppress_os_error() -> Iterator[None]:
    try:
        yield
    except OSError:
        pass


def _hold(lock: Path) -> int:
    """Create and lock a staging lock file; return its descriptor (closing it unlocks)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return fd
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a gc probes this file
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # a gc reaped the file between our open and lock: start again


def _reap_staging(lock: Path, directory: Path | None) -> tuple[int, int]:
    """Remove a staging directory and its lock file if no live process holds the lock."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        # the directory outlived its lock file: the owner is gone
        return (1, _remove(directory)) if directory is not None else (0, 0)
    try:
        if fcntl is None:
            age = time.time() - os.fstat(fd).st_mtime
            if age < 24 * 3600:
                return 0, 0
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    return 0, 0  # its writer is alive
                raise
        freed = _remove(directory) if directory is not None else 0
        lock.unlink(missing_ok=True)
        return 1, freed
    finally:
        os.close(fd)
