"""One read connection to a store's index per thread, kept between reads.

Opening an SQLite connection and reading its schema costs more than the queries a load then
runs (a few hundred microseconds, on every ``graft.load``). A thread therefore keeps its last
read connection and reuses it for the next read of the same index file. Each statement runs
in autocommit mode, so every read sees the latest committed state; reuse never serves an
older snapshot. The connection is read-only: kept open, it never writes the index, not even
the checkpoint SQLite runs when the last connection closes (a damaged index is set aside as
it was found).

The connection is dropped and a new one opened when:

- the index file is another file now (a rebuild set the old one aside: its device and inode
  differ), or the thread reads another store's index (one connection per thread, never more);
- its schema changed (SQLite's schema cookie): the tables are checked again, as on opening;
- a read on it failed (the caller then rebuilds or reports, as for a fresh connection);
- the process forked: a connection is never used, or closed, in a child it was inherited by.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

from graft.hub import index

__all__ = ["drop", "reader"]


class _Kept(threading.local):
    key: tuple[int, str, int, int] | None = None
    conn: sqlite3.Connection | None = None
    schema: int = -1  # the schema cookie when it was opened and its tables checked


_KEPT = _Kept()


def reader(path: Path) -> sqlite3.Connection:
    """A read connection to the index at ``path`` (``index.reader``), reused while this
    thread reads the same file.

    Raises:
        sqlite3.Error: the index is missing, damaged or of another schema.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise sqlite3.OperationalError(f"unable to open database file {path}") from None
    key = (os.getpid(), str(path), st.st_dev, st.st_ino)
    if _KEPT.key == key and _KEPT.conn is not None:
        # A changed schema (a table dropped or added) is checked again, as on opening.
        if _schema(_KEPT.conn) == _KEPT.schema:
            return _KEPT.conn
    drop()
    conn = index.reader(path, read_only=True)
    try:
        _KEPT.schema = _schema(conn)
    except BaseException:
        conn.close()
        raise
    _KEPT.key, _KEPT.conn = key, conn
    return conn


def _schema(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA schema_version").fetchone()[0])


def drop() -> None:
    """Close this thread's kept connection (one inherited over a fork is only forgotten)."""
    conn, key = _KEPT.conn, _KEPT.key
    _KEPT.key = _KEPT.conn = None
    if conn is not None and key is not None and key[0] == os.getpid():
        conn.close()
