"""The tables of the store's index (hub/index.py), version by version.

The schema version is SQLite's ``user_version``. A writer (who holds the store's lock)
migrates an older index forward one version at a time and sets the version last; an index
from a newer Graft is refused, never rewritten.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from graft.errors import StoreError

__all__ = ["SCHEMA_VERSION", "TABLES", "migrate", "require_tables"]

SCHEMA_VERSION = 5
_VERSION_1 = """
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
# Version 2: the fingerprint of each tree file when it was last hashed, and removed modules.
_MIGRATE_TO_2 = """
ALTER TABLE files ADD COLUMN mtime_ns INTEGER;
ALTER TABLE files ADD COLUMN ctime_ns INTEGER;
ALTER TABLE files ADD COLUMN inode INTEGER;
ALTER TABLE files ADD COLUMN checked_ns INTEGER;  -- when the file was hashed (time_ns)
CREATE TABLE IF NOT EXISTS removed (
    digest  TEXT PRIMARY KEY,   -- a module `graft rm` took out of the index
    removed TEXT NOT NULL       -- UTC, ISO 8601
);
"""
# Version 3: tensor-level blobs (hub/tensors.py). ``tensors`` says which blobs a module's
# weights are made of (gc counts them as referenced); ``blob_checks`` holds the fingerprint of
# each tensor blob when it was last hashed, once per blob however many modules share it.
_MIGRATE_TO_3 = """
CREATE TABLE IF NOT EXISTS tensors (
    module TEXT NOT NULL,       -- modules.digest
    kind   TEXT NOT NULL,       -- 'tensor', or 'header' (the safetensors header, name '')
    name   TEXT NOT NULL,
    sha256 TEXT NOT NULL,       -- the blob
    size   INTEGER NOT NULL,
    PRIMARY KEY (module, kind, name)
);
CREATE INDEX IF NOT EXISTS tensors_by_sha256 ON tensors (sha256);
CREATE TABLE IF NOT EXISTS blob_checks (
    sha256     TEXT PRIMARY KEY,
    size       INTEGER NOT NULL,
    mtime_ns   INTEGER NOT NULL,
    ctime_ns   INTEGER NOT NULL,
    inode      INTEGER NOT NULL,
    checked_ns INTEGER NOT NULL
);
"""
# Version 4: reference files as tensor blobs too (hub/tensorfiles.py): the blobs of each split
# file other than the weights, which gc counts as referenced (the tree records their order).
_MIGRATE_TO_4 = """
CREATE TABLE IF NOT EXISTS file_blobs (
    module TEXT NOT NULL,       -- modules.digest
    path   TEXT NOT NULL,       -- the module file, e.g. 'reference/classify.safetensors'
    part   INTEGER NOT NULL,    -- 0: its header; 1, 2, ...: its tensors in data order
    sha256 TEXT NOT NULL,       -- the blob
    size   INTEGER NOT NULL,
    PRIMARY KEY (module, path, part)
);
CREATE INDEX IF NOT EXISTS file_blobs_by_sha256 ON file_blobs (sha256);
"""
# Version 5: each module's blob fingerprints packed into one row, read by every load instead
# of hundreds of ``blob_checks`` rows (one per tensor). A cache of ``blob_checks`` for one
# module; a stale entry never vouches for a changed blob (its stat differs) and costs a hash.
_MIGRATE_TO_5 = """
CREATE TABLE IF NOT EXISTS module_checks (
    module TEXT PRIMARY KEY,    -- modules.digest
    checks BLOB NOT NULL        -- _PACKED records: sha256 (32 bytes) and a Fingerprint
);
"""
#: Every table of the current schema.
TABLES = frozenset({"modules", "files", "removed", "tensors", "blob_checks", "file_blobs",
                    "module_checks"})


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Create the index on an empty file, or bring an older one to :data:`SCHEMA_VERSION`.

    Raises:
        StoreError: the index was written by a newer Graft.
    """
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(f"the store index {path} has schema version {version}, newer "
                         f"than this Graft's {SCHEMA_VERSION}; upgrade graft-hub")
    if version < 1:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(_VERSION_1)
        version = 1
    for step, script in enumerate((_MIGRATE_TO_2, _MIGRATE_TO_3, _MIGRATE_TO_4,
                                   _MIGRATE_TO_5), start=2):
        if version < step:
            conn.executescript(script)
    if version < SCHEMA_VERSION:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def require_tables(conn: sqlite3.Connection) -> None:
    """Refuse an index that lost a table (a damaged or hand-edited file)."""
    found = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    missing = TABLES - found
    if missing:
        raise sqlite3.DatabaseError(f"database disk image is malformed (no table "
                                    f"{', '.join(sorted(missing))})")
