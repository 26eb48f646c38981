"""The store's SQLite index: which modules are stored, their files, and what was removed.

The index is a cache of what the module trees say, plus two things the trees cannot say:
which modules were deliberately removed (so that ``gc`` may delete their trees), and the
file-system fingerprint of each large file when it was last hashed (so that a load need not
hash 20 MB to know the weights are unchanged; see docs/store.md).

Because it is derived data, a lost or corrupt index is rebuilt from the trees, each
re-validated completely (``Store.rebuild_index``); a module is never deleted because its row
is gone. The tables and their migrations are in hub/schema.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

from graft._sqlite import transaction
from graft.errors import VersionConflict
from graft.format.manifest import MANIFEST_NAME, Manifest
from graft.hub import schema
from graft.hub.schema import SCHEMA_VERSION

__all__ = ["Fingerprint", "RACY_NS", "SCHEMA_VERSION", "conflict_message", "connect",
           "delete_module", "fingerprints", "forget_blob_checks", "forget_removed",
           "header_of", "insert_module", "is_corruption", "modules", "now_ns", "reader",
           "record_fingerprints", "record_split", "referenced_blobs", "removed_digests",
           "set_aside", "without_file_rows", "without_tensor_rows"]

BUSY_TIMEOUT = 60.0  # seconds SQLite waits on a busy database
# A timestamp only proves "unchanged since" once the clock has moved past the file system's
# timestamp granularity (2 s on the coarsest, FAT); a write in the same tick as the hash
# would otherwise keep the fingerprint (the "racy clean" problem git's index also has).
RACY_NS = 2_000_000_000


class Fingerprint(NamedTuple):
    """What ``stat`` said about a file when its bytes were last hashed and found intact (a
    tuple: a load reads hundreds, one per tensor blob)."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    checked_ns: int

    @classmethod
    def of(cls, st: os.stat_result, checked_ns: int) -> Fingerprint:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, checked_ns)

    def vouches_for(self, st: os.stat_result) -> bool:
        """Whether the file ``st`` describes is, by its metadata, the one that was hashed."""
        return ((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                == (self.size, self.mtime_ns, self.ctime_ns, self.inode)
                and self.checked_ns - self.ctime_ns >= RACY_NS)


def is_corruption(exc: sqlite3.Error) -> bool:
    """Whether an SQLite error, met by a writer holding the lock, means the index file is
    damaged (not merely busy or read-only)."""
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        return any(s in text for s in ("malformed", "no such table", "no such column"))
    return isinstance(exc, sqlite3.DatabaseError)  # "file is not a database", "malformed"


def reader(path: Path, *, timeout: float = BUSY_TIMEOUT,
           read_only: bool = False) -> sqlite3.Connection:
    """Open an existing index for reading (and small fingerprint updates, unless
    ``read_only``: such a connection never writes the file, not even a checkpoint when it
    closes); creates nothing.

    Raises:
        sqlite3.Error: the file cannot be opened or is not an index of this schema.
    """
    conn = sqlite3.connect(path.as_uri() + ("?mode=ro" if read_only else "?mode=rw"),
                           uri=True, timeout=timeout, isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except BaseException:
        conn.close()
        raise
    try:
        if version != SCHEMA_VERSION:
            # 0: being created by a writer right now; 1: a writer will migrate it first
            raise sqlite3.OperationalError(f"no such table (index schema {version})")
        schema.require_tables(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def connect(path: Path) -> sqlite3.Connection:
    """Open the index for a writer (who holds the lock): create or migrate it, and refuse a
    damaged file.

    Raises:
        sqlite3.DatabaseError: the file is damaged (the caller rebuilds it).
        StoreError: it was written by a newer Graft.
    """
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        schema.migrate(conn, path)
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"database disk image is malformed ({check})")
        schema.require_tables(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def modules(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM modules").fetchall()


def insert_module(conn: sqlite3.Connection, manifest: Manifest, created: str,
                  found: Mapping[str, Fingerprint], layout: Any = None,
                  split: Mapping[str, Any] | None = None) -> None:
    """Insert a module's rows (in the caller's transaction), with the fingerprint of each
    file (and tensor blob) in ``found``, and, for weights stored as tensor blobs, the blobs
    of its ``layout`` (a ``tensors.Layout``), and those of its other ``split`` files
    (path -> ``tensorfiles.FileLayout``).

    Raises:
        VersionConflict: another module has the name and version.
    """
    parents = json.dumps([{"handle": p.handle, "digest": p.digest} for p in manifest.parents])
    try:
        conn.execute("INSERT INTO modules (digest, name, version, created, size, parents) "
                     "VALUES (?, ?, ?, ?, ?, ?)",
                     (manifest.digest, manifest.name, manifest.version, created, manifest.size,
                      parents))
    except sqlite3.IntegrityError:
        row = conn.execute("SELECT digest FROM modules WHERE name = ? AND version = ?",
                           (manifest.name, manifest.version)).fetchone()
        raise VersionConflict(conflict_message(manifest, row["digest"] if row else "?")) \
            from None
    if layout is not None:
        conn.executemany("INSERT OR REPLACE INTO tensors (module, kind, name, sha256, size) "
                         "VALUES (?, ?, ?, ?, ?)",
                         [(manifest.digest, "header", "", layout.header_sha256,
                           len(layout.header))]
                         + [(manifest.digest, "tensor", name, sha256, size)
                            for name, sha256, size in layout.tensors])
    record_split(conn, manifest.digest, split or {})
    _record_blobs(conn, found)
    rows = []
    for rel, entry in manifest.files.items():
        f = found.get(rel)
        rows.append((manifest.digest, rel, entry.sha256, entry.size,
                     *((f.mtime_ns, f.ctime_ns, f.inode, f.checked_ns) if f
                       else (None, None, None, None))))
    conn.executemany("INSERT INTO files (module, path, sha256, size, mtime_ns, ctime_ns, inode, "
                     "checked_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.execute("DELETE FROM module_checks WHERE module = ?", (manifest.digest,))  # stale
    conn.execute("DELETE FROM removed WHERE digest = ?", (manifest.digest,))


def record_split(conn: sqlite3.Connection, digest: str, split: Mapping[str, Any]) -> None:
    """Record the blobs of a module's split files (path -> ``tensorfiles.FileLayout``), in
    the caller's transaction, replacing what was recorded."""
    conn.execute("DELETE FROM file_blobs WHERE module = ?", (digest,))
    conn.executemany("INSERT INTO file_blobs (module, path, part, sha256, size) "
                     "VALUES (?, ?, ?, ?, ?)",
                     [(digest, rel, part, sha256, size) for rel, layout in split.items()
                      for part, (sha256, size) in enumerate(layout.blobs())])


def delete_module(conn: sqlite3.Connection, digest: str, removed: str) -> None:
    """Take a module out of the index and remember that it was removed on purpose."""
    conn.execute("DELETE FROM files WHERE module = ?", (digest,))
    conn.execute("DELETE FROM tensors WHERE module = ?", (digest,))
    conn.execute("DELETE FROM file_blobs WHERE module = ?", (digest,))
    conn.execute("DELETE FROM module_checks WHERE module = ?", (digest,))
    conn.execute("DELETE FROM modules WHERE digest = ?", (digest,))
    conn.execute("INSERT OR REPLACE INTO removed (digest, removed) VALUES (?, ?)",
                 (digest, removed))


def fingerprints(query: Callable[..., list[Any]], digest: str
                 ) -> tuple[dict[str, Fingerprint], bool]:
    """The recorded fingerprint of each file of a module that has one (``query`` runs SQL on
    an open index), and whether its blobs' came from the module's packed row.

    Tensor blobs are keyed ``'sha256:<hex>'`` (tensors.blob_key; never a module path). They
    are read from the module's ``module_checks`` row, one row however many tensors; without
    one (a module not loaded since it was added, an index rebuilt), from ``blob_checks``,
    where a blob shared with a parent already has the fingerprint the parent's loads took.
    """
    found = {row["path"]: Fingerprint(row["size"], row["mtime_ns"], row["ctime_ns"],
                                      row["inode"], row["checked_ns"])
             for row in query("SELECT path, size, mtime_ns, ctime_ns, inode, checked_ns "
                              "FROM files WHERE module = ? AND checked_ns IS NOT NULL",
                              (digest,))}
    rows = query("SELECT checks FROM module_checks WHERE module = ?", (digest,))
    packed = _unpack(rows[0][0]) if rows else None
    if packed is not None:
        found.update(packed)
        return found, True
    # hundreds of rows: read by position
    found.update({"sha256:" + row[0]: Fingerprint(*row[1:])
                  for row in query("SELECT sha256, size, mtime_ns, ctime_ns, inode, checked_ns "
                                   "FROM blob_checks WHERE sha256 IN "
                                   "(SELECT sha256 FROM tensors WHERE module = ? UNION "
                                   "SELECT sha256 FROM file_blobs WHERE module = ?)",
                                   (digest, digest))})
    return found, False


#: One packed fingerprint: the blob's sha256 (raw), size, mtime_ns, ctime_ns, inode, checked_ns.
_PACKED = struct.Struct("<32sQqqQq")


def _pack(found: Mapping[str, Fingerprint]) -> bytes:
    return b"".join(_PACKED.pack(bytes.fromhex(key[7:]), *f) for key, f in found.items()
                    if key.startswith("sha256:"))


def _unpack(data: Any) -> dict[str, Fingerprint] | None:
    """A packed row's fingerprints; None for a row that is not what :func:`_pack` writes."""
    if not isinstance(data, bytes) or len(data) % _PACKED.size:
        return None
    return {"sha256:" + record[0].hex(): Fingerprint(*record[1:])
            for record in _PACKED.iter_unpack(data)}


def header_of(query: Callable[..., list[Any]], digest: str) -> str | None:
    """The hex sha256 of a module's weights header blob, if recorded."""
    rows = query("SELECT sha256 FROM tensors WHERE module = ? AND kind = 'header'", (digest,))
    return str(rows[0]["sha256"]) if rows else None


def _record_blobs(conn: sqlite3.Connection, found: Mapping[str, Fingerprint]) -> None:
    conn.executemany("INSERT OR REPLACE INTO blob_checks (sha256, size, mtime_ns, ctime_ns, "
                     "inode, checked_ns) VALUES (?, ?, ?, ?, ?, ?)",
                     [(key.removeprefix("sha256:"), f.size, f.mtime_ns, f.ctime_ns, f.inode,
                       f.checked_ns) for key, f in found.items() if key.startswith("sha256:")])


def record_fingerprints(path: Path, digest: str, found: dict[str, Fingerprint], *,
                        pack: Mapping[str, Fingerprint] | None = None) -> None:
    """Best effort: remember files just hashed and found intact, so later loads can trust
    their metadata, and with ``pack``, replace the module's packed row with those blob
    fingerprints. A read-only or busy index is left as it is (the next load hashes again)."""
    if not found and pack is None:
        return
    try:
        with closing(reader(path, timeout=1.0)) as conn:
            # A lost fingerprint costs one more hash, never a wrong answer: no fsync for it.
            conn.execute("PRAGMA synchronous = NORMAL")
            with transaction(conn):
                _record_blobs(conn, found)
                conn.executemany("UPDATE files SET mtime_ns = ?, ctime_ns = ?, inode = ?, "
                                 "checked_ns = ? WHERE module = ? AND path = ? AND "
                                 "size = ?",
                                 [(f.mtime_ns, f.ctime_ns, f.inode, f.checked_ns, digest, rel,
                                   f.size) for rel, f in found.items()])
                if pack is not None and conn.execute("SELECT 1 FROM modules WHERE digest = ?",
                                                     (digest,)).fetchone():
                    conn.execute("INSERT OR REPLACE INTO module_checks (module, checks) "
                                 "VALUES (?, ?)", (digest, _pack(pack)))
    except (sqlite3.Error, struct.error, ValueError):
        pass


def removed_digests(conn: sqlite3.Connection) -> set[str]:
    return {r["digest"] for r in conn.execute("SELECT digest FROM removed")}


def forget_removed(conn: sqlite3.Connection, digest: str) -> None:
    conn.execute("DELETE FROM removed WHERE digest = ?", (digest,))


def referenced_blobs(conn: sqlite3.Connection) -> set[str]:
    """Every blob an indexed module references: its files and its tensor blobs."""
    return {r["sha256"] for r in conn.execute("SELECT sha256 FROM files UNION "
                                              "SELECT sha256 FROM tensors UNION "
                                              "SELECT sha256 FROM file_blobs")}


def without_tensor_rows(conn: sqlite3.Connection) -> list[str]:
    """Digests of indexed modules that have no weights header row in ``tensors``."""
    return [r["digest"] for r in conn.execute(
        "SELECT digest FROM modules WHERE digest NOT IN "
        "(SELECT module FROM tensors WHERE kind = 'header')")]


def without_file_rows(conn: sqlite3.Connection) -> list[str]:
    """Digests of indexed modules that have no rows in ``file_blobs`` (none of their files
    split, or an index that lost or never had them)."""
    return [r["digest"] for r in conn.execute(
        "SELECT digest FROM modules WHERE digest NOT IN (SELECT module FROM file_blobs)")]


def forget_blob_checks(conn: sqlite3.Connection) -> None:
    """Drop the fingerprints of blobs that no module references any more, and the packed
    rows of modules no longer indexed."""
    conn.execute("DELETE FROM blob_checks WHERE sha256 NOT IN (SELECT sha256 FROM tensors "
                 "UNION SELECT sha256 FROM file_blobs)")
    conn.execute("DELETE FROM module_checks WHERE module NOT IN (SELECT digest FROM modules)")


def conflict_message(manifest: Manifest, stored_digest: str) -> str:
    return (f"{manifest.name}@{manifest.version} is already in the store as {stored_digest}, "
            f"and the module being added ({manifest.digest}) differs from it; give the new "
            f"module a new version (e.g. bump it in {MANIFEST_NAME} when saving), or remove the "
            f"stored one first with `graft rm {manifest.name}@{manifest.version}`")


def now_ns() -> int:
    """The wall clock in nanoseconds, comparable with file timestamps."""
    return time.time_ns()


def set_aside(path: Path) -> Path:
    """Move a damaged index (and its WAL files) out of the way; return where it went."""
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(path, aside)
    for suffix in ("-wal", "-shm"):
        extra = path.with_name(path.name + suffix)
        if extra.exists():
            os.replace(extra, aside.with_name(aside.name + suffix))
    return aside
