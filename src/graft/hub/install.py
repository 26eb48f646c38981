"""Writing a module into the store: blobs, then the tree, then the index row.

The weights are split into a header blob and tensor blobs (hub/tensors.py), and so are the
reference files (hub/tensorfiles.py, recorded in the tree); every other file is one blob,
hard-linked into the tree.

Each step publishes with one rename, so every state a reader or a crash can leave is
complete; a failed install takes back what it created (a killed one leaves only ``tmp/``
entries for the next writer, or a complete tree without a row, which ``gc`` indexes again).
"""

from __future__ import annotations

import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from graft._sqlite import transaction
from graft._testing import stop_point
from graft.format.manifest import Manifest
from graft.hub import index, staging
from graft.hub.blobs import link_or_copy, place_blob, publish
from graft.hub import tensorfiles
from graft.hub.tensors import HEADER_LINK, WEIGHTS, place_weights
from graft.hub.trees import fingerprinted

__all__ = ["commit_tree", "install"]


def install(store: Any, source: Path, manifest: Manifest, conn: sqlite3.Connection, *,
            repairing: bool = False) -> str:
    """Write blobs and the module tree, then the index row.

    When ``repairing`` an indexed module, damaged blobs and the tree are rewritten and the
    row stays. On failure, what this call created is taken back. The caller holds the
    writer lock.

    Returns:
        When the row was created (UTC, ISO 8601); "" when repairing.
    """
    work = staging.new_work(store._tmp)
    new_blobs: list[Path] = []
    try:
        # The weights become a header blob and one blob per tensor (hub/tensors.py): a child
        # shares every tensor it did not change with its parent.
        layout, created = place_weights(store.blob_path, source, manifest, work)
        new_blobs += created
        # Reference files too: a child saved with its parent's example inputs shares them.
        split: dict[str, tensorfiles.FileLayout] = {}
        for rel, entry in manifest.files.items():
            if tensorfiles.is_stored_split(rel):
                split[rel], created = tensorfiles.place(store.blob_path, source, rel, entry,
                                                        work)
                new_blobs += created
                stop_point("add.blob-placed")
        placed: set[str] = set()
        for rel, entry in manifest.files.items():
            if rel == WEIGHTS or rel in split:
                continue
            if entry.sha256 not in placed:
                if place_blob(store.blob_path(entry.sha256), source, rel, entry, work):
                    new_blobs.append(store.blob_path(entry.sha256))
                placed.add(entry.sha256)
                stop_point("add.blob-placed")
        tree = work / "tree"
        tree.mkdir()
        for rel, entry in manifest.files.items():
            if rel == WEIGHTS or rel in split:
                continue
            dest = tree / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(store.blob_path(entry.sha256), dest)
        link_or_copy(store.blob_path(layout.header_sha256), tree / HEADER_LINK)
        tensorfiles.write_record(tree, split)
        manifest.write(tree)
        stop_point("add.tree-built")
        return commit_tree(store, conn, manifest, tree, work, layout, split,
                           lambda target: _fingerprints(target, manifest, split),
                           repairing=repairing)
    except BaseException:
        for blob in new_blobs:
            blob.unlink(missing_ok=True)
        raise
    finally:
        staging.rmtree(work)


def commit_tree(store: Any, conn: sqlite3.Connection, manifest: Manifest, tree: Path,
                work: Path, layout: Any, split: Mapping[str, Any],
                fingerprints: Callable[[Path], Mapping[str, index.Fingerprint]], *,
                repairing: bool) -> str:
    """Publish a checked tree in place of the module's (one rename), then write its index
    row (or, when ``repairing``, its record of split files); a failure takes the published
    tree back out. The caller holds the writer lock and takes back its own blobs.

    Args:
        fingerprints: The published tree's path -> fingerprints of the tensor files and blobs
            just checked.

    Returns:
        When the row was created (UTC, ISO 8601); "" when repairing.
    """
    target = store.module_path(manifest.digest)
    if target.exists():
        # a tree without an index row (a killed add, a removed module still in use), or one
        # being repaired
        os.replace(target, work / "previous")
    publish(tree, target)
    stop_point("add.tree-published")
    try:
        if repairing:  # a tree written before its reference files were split, say
            with transaction(conn):
                index.record_split(conn, manifest.digest, split)
            return ""
        created = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        with transaction(conn):
            index.insert_module(conn, manifest, created, fingerprints(target), layout, split)
            stop_point("add.row-inserted")
        return created
    except BaseException:
        if not repairing:
            with staging.suppress_os_error():
                os.replace(target, work / "failed")
        raise


def _fingerprints(tree: Path, manifest: Manifest, split: Any) -> dict[str, index.Fingerprint]:
    """Fingerprints of the tensor files of a tree just built from checked blobs (linking
    changed their ctime a moment ago, so the first load after the racy window hashes them
    once more before trusting these)."""
    checked = index.now_ns()
    return {rel: index.Fingerprint.of(os.stat(tree / rel), checked)
            for rel in manifest.files
            if fingerprinted(rel) and rel != WEIGHTS and rel not in split}
