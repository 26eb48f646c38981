"""Collecting garbage in the store, and taking in trees that lost their index row.

Only four things are ever deleted: blobs that no indexed module references, ``tmp/`` entries
whose writer is gone (hub/staging.py), trees of modules that ``graft rm`` took out of the
index on purpose, once no process holds their lease (hub/leases.py), and registry downloads
in ``oci-cache/`` that no pull needs any more, once no pull is running (hub/oci/cache.py). A tree that has no row
and was not removed (an add killed between publishing the tree and committing the row, a lost
row, a lost index) is validated completely and indexed again: a module is never deleted
because its row vanished.
"""

from __future__ import annotations

import os
import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from graft._sqlite import transaction
from graft._testing import stop_point
from graft.errors import GraftError
from graft.format.manifest import MANIFEST_NAME, Manifest
from graft.hub import index, leases, staging, tensorfiles
from graft.hub.blobs import link_or_copy
from graft.hub.lookup import hex_of
from graft.hub.tensors import HEADER_LINK, WEIGHTS, is_split, read_layout
from graft.hub.trees import validate_tree

__all__ = ["GcReport", "TREE_NAME", "adopt", "collect", "delete_unused_tree"]

TREE_NAME = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class GcReport:
    """What ``Store.gc`` did.

    Args:
        blobs_removed: Blobs that no indexed module referenced.
        bytes_freed: Bytes given back to the filesystem (last links only).
        tmp_removed: Abandoned entries of ``tmp/``.
        trees_removed: Trees of removed modules that no process uses any more.
        trees_adopted: Complete, valid trees without an index row (an add killed after
            publishing its tree, or a lost row), indexed again rather than deleted.
        trees_kept: Unindexed trees left alone: still in use, damaged, or clashing with an
            indexed module's name and version.
        downloads_removed: Files of ``oci-cache/`` (partial and finished downloads) that no
            pull needs.
        downloads_busy: A pull was running, so ``oci-cache/`` was left as it was.
    """

    blobs_removed: int
    bytes_freed: int
    tmp_removed: int
    trees_removed: int = 0
    trees_adopted: int = 0
    trees_kept: int = 0
    downloads_removed: int = 0
    downloads_busy: bool = False


def collect(store: Any, conn: sqlite3.Connection, *, downloads: bool = False) -> GcReport:
    """Collect the garbage of ``store``; the caller holds the writer lock and passes its
    connection. ``downloads``: delete every registry download no running pull holds, not
    only the stale ones and those the store already has."""
    indexed = {hex_of(r["digest"]) for r in index.modules(conn)}
    removed = {hex_of(d) for d in index.removed_digests(conn)}
    freed = trees = adopted = kept = tmp = blobs = 0
    keep: set[str] = set()  # blobs of unindexed trees left in place, for when they return
    for tree in staging.entries(store._modules):
        if tree.name in indexed:
            continue
        if tree.name in removed:
            gone = delete_unused_tree(store, conn, "sha256:" + tree.name)
            if gone is not None:
                trees, freed = trees + 1, freed + gone
                continue
        elif adopt(store, conn, tree) is not None:
            adopted += 1
            continue
        kept += 1
        keep |= _blobs_named_by(tree)
    for hexdigest in removed - {t.name for t in staging.entries(store._modules)}:
        with transaction(conn):
            index.forget_removed(conn, "sha256:" + hexdigest)
    for entry in staging.entries(store._tmp):
        reaped, size = staging.reap(store._tmp, entry)
        tmp, freed = tmp + reaped, freed + size
    leases.reap(store._leases, store._modules)
    # A module indexed without its tensor rows (an index migrated from before tensor-level
    # storage while a newer Graft had written split trees) still owns its tensor blobs.
    for digest in index.without_tensor_rows(conn):
        keep |= _blobs_named_by(store.module_path(digest))
    # Likewise the blobs of split reference files whose rows an index lacks (the tree's
    # record names them).
    for digest in index.without_file_rows(conn):
        if os.path.lexists(store.module_path(digest) / tensorfiles.RECORD):
            keep |= _blobs_named_by(store.module_path(digest))
    referenced = index.referenced_blobs(conn) | keep
    with transaction(conn):
        index.forget_blob_checks(conn)
    for fan in staging.entries(store._blobs):
        for blob in staging.entries(fan):
            if blob.name not in referenced:
                freed += staging.remove(blob)
                blobs += 1
                stop_point("gc.blob-deleted")
        with staging.suppress_os_error():
            fan.rmdir()  # only succeeds once the fan-out folder is empty
    from graft.hub.oci.cache import BlobCache

    got, size, busy = BlobCache(store.root).collect(
        lambda hexdigest: os.path.isfile(store.blob_file(hexdigest)), everything=downloads)
    return GcReport(blobs_removed=blobs, bytes_freed=freed + size, tmp_removed=tmp,
                    trees_removed=trees, trees_adopted=adopted, trees_kept=kept,
                    downloads_removed=got, downloads_busy=busy)


def adopt(store: Any, conn: sqlite3.Connection, tree: Path) -> Any:
    """Index a tree that has no row, after validating it completely.

    Returns:
        Its ``StoredModule``, or None (the tree left alone) when it is not a valid module or
        clashes with an indexed module's name and version.
    """
    if not TREE_NAME.fullmatch(tree.name):
        return None
    try:
        manifest, fresh = validate_tree(tree, store.blob_file)
        layout = read_layout(tree, manifest) if is_split(tree) else None
        split = tensorfiles.read_record(tree, manifest)
        for rel, entry in manifest.files.items():
            if (layout is not None and rel == WEIGHTS) or rel in split:
                continue  # its blobs were just checked: they are all there
            blob = store.blob_path(entry.sha256)
            if not blob.exists():  # gc may have collected it while the row was missing
                blob.parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(tree / rel, blob)
        if layout is not None and not store.blob_path(layout.header_sha256).exists():
            store.blob_path(layout.header_sha256).parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(tree / HEADER_LINK, store.blob_path(layout.header_sha256))
        created = datetime.fromtimestamp((tree / MANIFEST_NAME).stat().st_mtime,
                                         timezone.utc).isoformat(timespec="microseconds")
        with transaction(conn):
            index.insert_module(conn, manifest, created, fresh, layout, split)
    except (GraftError, OSError):
        return None
    return store._stored(conn.execute("SELECT * FROM modules WHERE digest = ?",
                                      (manifest.digest,)).fetchone())


def delete_unused_tree(store: Any, conn: sqlite3.Connection, digest: str) -> int | None:
    """Delete a removed module's tree unless a process holds its lease.

    Returns:
        The bytes freed, or None when the tree is in use (it stays, for a later gc).
    """
    lease = store._leases / hex_of(digest)
    fd = staging.unheld(lease)
    if fd is None:
        return None
    try:
        freed = _discard(store._tmp, store.module_path(digest))
        stop_point("rm.tree-deleted")
        with transaction(conn):
            index.forget_removed(conn, digest)
        lease.unlink(missing_ok=True)  # while we hold it: a waiting reader retries
    finally:
        if fd >= 0:
            os.close(fd)
    return freed


def _blobs_named_by(tree: Path) -> set[str]:
    """The blobs a tree's manifest names (none when it cannot be read)."""
    try:
        manifest = Manifest.read(tree)
    except (GraftError, OSError):
        return set()
    # a tensor blob is named by the manifest's sha256 of the tensor, whatever the header says
    named = {e.sha256 for e in manifest.files.values()} | {
        e.sha256 for e in manifest.tensors.values()}
    try:
        if is_split(tree):
            named.add(read_layout(tree, manifest).header_sha256)
    except (GraftError, OSError):
        pass
    try:
        for split in tensorfiles.read_record(tree, manifest).values():
            named |= {sha for sha, _ in split.blobs()}
    except (GraftError, OSError):
        pass
    return named


def _discard(tmp: Path, tree: Path) -> int:
    """Take a tree out of sight in one rename, then delete it; the bytes freed."""
    if not tree.exists():
        return 0
    work = staging.new_work(tmp)
    try:
        os.replace(tree, work / "discarded")
        return staging.remove(work / "discarded")
    finally:
        staging.rmtree(work)
