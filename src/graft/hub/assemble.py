"""Adding a module from its blobs: what a pull hands the store.

A registry sends a module as blobs named by their sha256 (docs/registry.md): each file whole,
and each safetensors file as its header and one blob per tensor. Those are the store's own
blobs (hub/tensors.py, hub/tensorfiles.py), so a pull's verified downloads are linked into
place rather than assembled into a module directory that ``Store.add`` would split again:
each byte is written once. Only files the store keeps whole but the wire splits (program
constants) are concatenated into one blob.

Nothing handed in is trusted. Every blob is hashed as it is taken, and the tree built from
them is validated as completely as ``Store.add`` validates a directory
(:func:`graft.hub.trees.validate_tree`: every byte hashed, each safetensors file rebuilt to
the manifest's sha256, every program checked) before it is published; the index row comes
last. The order of install.py holds: blobs (durable), then the tree (one rename), then the
row, and a failure takes back what this call created.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import uuid
from pathlib import Path
from typing import AbstractSet as Set, Any, Callable, Mapping

from graft._fs import fsync_dir
from graft._testing import stop_point
from graft.errors import FormatError, IntegrityError
from graft.format.manifest import Manifest
from graft.hub import staging, tensorfiles
from graft.hub.blobs import link_or_copy
from graft.hub.install import commit_tree
from graft.hub.lookup import hex_of
from graft.hub.tensorfiles import FileLayout, is_stored_split
from graft.hub.tensors import HEADER_LINK, WEIGHTS, copy_hashed, read_layout, valid_blob
from graft.hub.trees import validate_tree

__all__ = ["Fetch", "Source", "install_blobs"]

#: Where a blob's bytes are: ``(file, start, end)``.
Source = tuple[Path, int, int]
#: Called with ``(hex sha256, size)`` of blobs that no source holds intact; returns a file
#: holding each (a pull downloads them).
Fetch = Callable[[list[tuple[str, int]]], Mapping[str, Path]]

_READ_ONLY = 0o444


def install_blobs(store: Any, manifest: Manifest, layouts: Mapping[str, FileLayout],
                  sources: Mapping[str, Source], fresh: Set[str], fetch: Fetch,
                  conn: sqlite3.Connection, *, repairing: bool = False,
                  checked_programs: Set[str] = frozenset()) -> str:
    """Write a module's blobs and tree from the blobs it was sent as, then its index row.

    Args:
        store: The ``Store``; the caller holds its writer lock.
        manifest: The module's manifest (its digest already checked by the caller).
        layouts: Every safetensors file sent as header and tensor blobs: its layout, the
            tensors in data order.
        sources: Hex sha256 -> where that blob's bytes are (downloads, older trees).
        fresh: Blobs whose sources are the caller's own files, hashed a moment ago (a
            pull's downloads): handed over, they are hard-linked in and hashed once more,
            by the tree check. Every other source is hashed, then copied.
        fetch: Gets the blobs that neither the store nor ``sources`` holds intact.
        repairing: The module is indexed but damaged: its blobs and tree are rewritten and
            the row stays.
        checked_programs: sha256s of program files the caller ran ``check_programs`` on for
            this manifest (``validate_tree``).

    Returns:
        When the row was created (UTC, ISO 8601); "" when repairing.

    Raises:
        IntegrityError / FormatError: the blobs do not make up the module ``manifest``
            describes; nothing is left behind.
    """
    if WEIGHTS not in layouts:
        raise FormatError(f"{manifest.name}@{manifest.version} was sent without its {WEIGHTS} "
                          "as tensor blobs")
    work = staging.new_work(store._tmp)
    taker = _Taker(store, sources, fresh, fetch, work)
    try:
        for sha, size in _kept_blobs(manifest, layouts).items():
            taker.place(sha, size)
        for rel, layout in layouts.items():
            if rel != WEIGHTS and not is_stored_split(rel):
                taker.concatenate(rel, layout, manifest.files[rel].sha256)
        taker.make_durable()
        tree = work / hex_of(manifest.digest)  # validate_tree reads the digest off the name
        tree.mkdir()
        split = {rel: layout for rel, layout in layouts.items() if is_stored_split(rel)}
        for rel, entry in manifest.files.items():
            if rel not in layouts or not (rel == WEIGHTS or rel in split):
                dest = tree / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(store.blob_path(entry.sha256), dest)
        link_or_copy(store.blob_path(layouts[WEIGHTS].header[0]), tree / HEADER_LINK)
        tensorfiles.write_record(tree, split)
        manifest.write(tree)
        checked, fingerprints = validate_tree(tree, store.blob_file,
                                              checked_programs=checked_programs)
        if checked.digest != manifest.digest:
            raise IntegrityError(f"the blobs of {manifest.name} make up {checked.digest}, not "
                                 f"{manifest.digest}")
        layout = read_layout(tree, manifest)
        stop_point("add.tree-built")
        return commit_tree(store, conn, manifest, tree, work, layout, split,
                           lambda target: fingerprints, repairing=repairing)
    except BaseException:
        for blob in taker.created:
            blob.unlink(missing_ok=True)
        raise
    finally:
        staging.rmtree(work)


def _kept_blobs(manifest: Manifest, layouts: Mapping[str, FileLayout]) -> dict[str, int]:
    """``hex sha256 -> size`` of the blobs taken as they were sent: the weights' and
    reference files' headers and tensors, and the files sent whole."""
    kept: dict[str, int] = {}
    for rel, entry in manifest.files.items():
        layout = layouts.get(rel)
        if layout is None:
            kept.setdefault(entry.sha256, entry.size)
        elif rel == WEIGHTS or is_stored_split(rel):
            for sha, size in layout.blobs():
                kept.setdefault(sha, size)
        # else: sent split but kept whole, put together by _Taker.concatenate
    return kept


class _Taker:
    """Puts blobs into the store from the sources of one install, hashing each."""

    def __init__(self, store: Any, sources: Mapping[str, Source], fresh: Set[str],
                 fetch: Fetch, work: Path) -> None:
        self.store, self.sources, self.fetch, self.work = store, dict(sources), fetch, work
        self.fresh = fresh
        self.created: list[Path] = []  # taken back on failure
        self._dirs: set[Path] = set()

    def place(self, sha: str, size: int) -> None:
        """Make sure the store holds the blob ``sha`` intact."""
        blob = self.store.blob_path(sha)
        if valid_blob(blob, size, sha):
            return
        existed = os.path.lexists(blob)
        path, start, _ = self._verified(sha, size)
        part = self.work / f"{uuid.uuid4().hex}.part"
        linked = False
        if sha in self.fresh and start == 0 and _whole_file(path, size):
            # a download handed over (fsynced when it finished); any other file is copied,
            # never shared with the store
            try:
                os.link(path, part)
                linked = True
            except OSError:  # another file system, or no hard links: copy
                pass
        if not linked:
            with open(path, "rb") as src, open(part, "xb") as out:
                src.seek(start)
                if copy_hashed(src, out, size, hashlib.sha256()) != size:
                    raise IntegrityError(f"blob sha256:{sha} changed while it was being "
                                         "stored; pull again")
                out.flush()
                os.fsync(out.fileno())
        os.chmod(part, _READ_ONLY)
        self._publish(part, blob, existed)
        stop_point("add.blob-placed")

    def concatenate(self, rel: str, layout: FileLayout, sha256: str) -> None:
        """Store the file ``rel``, sent as blobs, whole (the store does not split it)."""
        blob = self.store.blob_path(sha256)
        if valid_blob(blob, layout.size, sha256):
            return
        existed = os.path.lexists(blob)
        whole = hashlib.sha256()
        part = self.work / f"{uuid.uuid4().hex}.part"
        with open(part, "xb") as out:
            for sha, size in layout.blobs():
                path, start, _ = self._verified(sha, size)
                with open(path, "rb") as src:
                    src.seek(start)
                    copy_hashed(src, out, size, whole)
            out.flush()
            os.fsync(out.fileno())
        if whole.hexdigest() != sha256:
            raise IntegrityError(f"{rel}, put together from its blobs, does not match its "
                                 "sha256 in the manifest; refused")
        os.chmod(part, _READ_ONLY)
        self._publish(part, blob, existed)

    def make_durable(self) -> None:
        """fsync the blob folders written to (each once, not once per blob)."""
        for folder in sorted(self._dirs):
            with staging.suppress_os_error():  # not every platform fsyncs folders
                fsync_dir(folder)

    def _publish(self, part: Path, blob: Path, existed: bool) -> None:
        try:
            os.replace(part, blob)  # over a damaged blob too
        except FileNotFoundError:  # the blob's folder is new
            blob.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, blob)
        self._dirs.add(blob.parent)
        if not existed:
            self.created.append(blob)

    def _verified(self, sha: str, size: int) -> Source:
        """A source that holds the blob ``sha`` intact, fetched if none does: hashed now,
        unless the caller just hashed it (a download; the tree check hashes it again)."""
        source = self.sources.get(sha)
        fresh = sha in self.fresh and source is not None and source[2] - source[1] == size
        if not fresh and (source is None or not _holds(source, sha, size)):
            got = self.fetch([(sha, size)])
            source = (Path(got[sha]), 0, size)
            if not _holds(source, sha, size):
                raise IntegrityError(f"blob sha256:{sha} was fetched again and still does not "
                                     "match its digest; pull again")
            self.sources[sha] = source
        return source


def _holds(source: Source, sha: str, size: int) -> bool:
    path, start, end = source
    if end - start != size:
        return False
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return copy_hashed(f, None, size, digest) == size and digest.hexdigest() == sha
    except OSError:
        return False


def _whole_file(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False
