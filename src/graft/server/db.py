"""The server's metadata in SQLite: what each repository holds, tags, tokens, the module index.

A row is the moment something becomes visible: a blob is served from a repository once a
``repo_blobs`` row links it, a manifest once its ``manifests`` row exists, a tag once its
``tags`` row points at that manifest. Each push writes its rows in one immediate transaction
after the bytes are durable on disk, so a crash leaves every push either wholly visible or
invisible. ``tag_events`` is append-only: pushes, moves and yanks are recorded, never rewritten.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from graft._sqlite import transaction

__all__ = ["Database", "now"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS namespaces (
    name    TEXT PRIMARY KEY,
    private INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id        TEXT PRIMARY KEY,   -- the public half of the token
    hash      TEXT NOT NULL,      -- sha256 of 'id:secret', hex
    namespace TEXT NOT NULL,
    scope     TEXT NOT NULL CHECK (scope IN ('pull', 'push')),
    created   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS blobs (
    digest  TEXT PRIMARY KEY,
    size    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS repo_blobs (
    repo    TEXT NOT NULL,
    digest  TEXT NOT NULL,
    PRIMARY KEY (repo, digest)
);
CREATE TABLE IF NOT EXISTS uploads (
    id      TEXT PRIMARY KEY,
    repo    TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS manifests (
    repo          TEXT NOT NULL,
    digest        TEXT NOT NULL,
    media_type    TEXT NOT NULL,
    artifact_type TEXT,
    subject       TEXT,
    size          INTEGER NOT NULL,
    annotations   TEXT NOT NULL DEFAULT '{}',
    created       TEXT NOT NULL,
    PRIMARY KEY (repo, digest)
);
CREATE INDEX IF NOT EXISTS manifests_by_subject ON manifests (repo, subject);
CREATE TABLE IF NOT EXISTS tags (
    repo    TEXT NOT NULL,
    tag     TEXT NOT NULL,
    digest  TEXT NOT NULL,
    PRIMARY KEY (repo, tag)
);
CREATE TABLE IF NOT EXISTS tag_events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    repo    TEXT NOT NULL,
    tag     TEXT NOT NULL,
    digest  TEXT NOT NULL,
    event   TEXT NOT NULL,        -- push, move, yank, unyank
    at      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS modules (
    repo          TEXT NOT NULL,
    version       TEXT NOT NULL,
    manifest      TEXT NOT NULL,  -- the OCI manifest digest
    module_digest TEXT NOT NULL,  -- the Graft module digest (sha256 of canonical graft.json)
    name          TEXT NOT NULL,
    description   TEXT NOT NULL,
    license       TEXT NOT NULL,
    card          TEXT NOT NULL,  -- README.md, Markdown source
    config        TEXT NOT NULL,  -- canonical graft.json
    created       TEXT NOT NULL,
    yanked        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (repo, version)
);
CREATE INDEX IF NOT EXISTS modules_by_digest ON modules (module_digest);
CREATE TABLE IF NOT EXISTS module_signatures (
    repo      TEXT NOT NULL,
    version   TEXT NOT NULL,
    signature TEXT NOT NULL,
    inputs    TEXT NOT NULL,      -- 'name: float32[batch,3]' lines
    outputs   TEXT NOT NULL,
    PRIMARY KEY (repo, version, signature)
);
CREATE TABLE IF NOT EXISTS module_parents (
    repo    TEXT NOT NULL,
    version TEXT NOT NULL,
    handle  TEXT NOT NULL,
    digest  TEXT NOT NULL        -- the parent's Graft module digest
);
CREATE INDEX IF NOT EXISTS module_parents_by_digest ON module_parents (digest);
"""
_BUSY_MS = 60_000


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


class Database:
    """The metadata database of one server root, with one connection per thread.

    Args:
        path: The SQLite file (created with the schema on first use).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: transactions are explicit (graft._sqlite.transaction).
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=_BUSY_MS / 1000,
                                   check_same_thread=True)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
            self._local.conn = conn
        return conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One immediate transaction: every row in it becomes visible at once, or none."""
        conn = self._conn()
        with transaction(conn):
            yield conn

    def rows(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        return self._conn().execute(sql, args).fetchall()

    def row(self, sql: str, *args: Any) -> sqlite3.Row | None:
        return self._conn().execute(sql, args).fetchone()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- queries the API and the pages share ------------------------------------------------

    def blob_in_repo(self, repo: str, digest: str) -> int | None:
        """The size of a blob the repository may serve, or None."""
        row = self.row("SELECT b.size FROM repo_blobs r JOIN blobs b ON b.digest = r.digest "
                       "WHERE r.repo = ? AND r.digest = ?", repo, digest)
        return None if row is None else int(row[0])

    def manifest(self, repo: str, digest: str) -> sqlite3.Row | None:
        return self.row("SELECT * FROM manifests WHERE repo = ? AND digest = ?", repo, digest)

    def tag(self, repo: str, tag: str) -> str | None:
        row = self.row("SELECT digest FROM tags WHERE repo = ? AND tag = ?", repo, tag)
        return None if row is None else str(row[0])

    def is_private(self, namespace: str) -> bool:
        row = self.row("SELECT private FROM namespaces WHERE name = ?", namespace)
        return bool(row and row[0])
