"""The store's read operations: find a module by its handle and check its tree on every read.

Readers never take the writer lock. Each read checks the tree against its index row (docs/
store.md says how; hub/trees.py does it), hashing only what changed since it was last hashed,
and records the fingerprints it hashed. ``Store`` (hub/store.py) adds the writes.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from typing import Any, Callable

from graft._testing import stop_point
from graft.errors import GraftError, HandleError, IntegrityError, ModuleNotFound
from graft.format.manifest import Manifest
from graft.hub import index, leases
from graft.hub.handles import Handle
from graft.hub.lookup import HOW_TO_ADD, find, hex_of, store_handle, version_key
from graft.hub.storeroot import StoreRoot, StoredModule
from graft.hub.tensors import is_split
from graft.hub.trees import check_tree

__all__ = ["StoreReading"]


class StoreReading(StoreRoot):
    """The read operations of the local store (see :class:`~graft.hub.store.Store`)."""

    def resolve(self, handle: str | Handle) -> StoredModule:
        """Find a stored module and check its tree (see :meth:`open`).

        Args:
            handle: ``name`` (the latest version: highest release numbers, ties broken by
                the most recently added), ``name@version`` or ``name@sha256:<hex>``.

        Raises:
            ModuleNotFound: no such module is stored; the message lists what is.
            IntegrityError: the stored copy is damaged.
        """
        stored, _ = self.open(handle)
        if stored.lease is not None:
            stored.lease.close()  # only a loaded module keeps its tree from removal
        return dataclasses.replace(stored, lease=None)

    def open(self, handle: str | Handle, *, reading_tensors: bool = False
             ) -> tuple[StoredModule, Manifest]:
        """Like :meth:`resolve`, and also return the manifest the check read.

        The check re-hashes ``graft.json``, the programs and the assets, and hashes tensor
        files and blobs whose file-system fingerprint changed since they were last hashed.
        The returned entry holds a lease: until it is garbage-collected (the loader keeps it
        on the module), ``remove`` and ``gc`` leave the tree in place.

        Args:
            reading_tensors: The caller reads every tensor next with :meth:`read_tensors`,
                which checks each blob on the descriptor it reads (one pass, not two).
        """
        stored, recorded, packed, header = self._find_with_fingerprints(
            store_handle(handle, "resolve"))
        stop_point("store.found")
        lease = leases.take(self._leases / hex_of(stored.digest))
        defer = reading_tensors and header is not None and is_split(stored.path)
        manifest, hashed = self._check(stored, level="read", recorded=recorded, header=header,
                                       defer=defer, packed=packed)
        stop_point("store.opened")
        return dataclasses.replace(stored, lease=lease, deferred=recorded if defer else None,
                                   repack=defer and (hashed or not packed)), manifest

    def read_tensors(self, stored: StoredModule, manifest: Manifest,
                     alloc: Callable[[str, int], Any],
                     mapped: Callable[[str, int, int], None] | None = None) -> None:
        """Read every tensor of a module opened with ``reading_tensors=True`` into buffers
        from ``alloc(name, size)``, checking each blob as it is read: its size on the
        descriptor, its bytes hashed unless its fingerprint vouches for them (then recorded).
        A vouched-for blob goes to ``mapped(name, fd, size)`` instead, when given.

        Raises:
            IntegrityError: a blob is missing, of the wrong size or altered.
        """
        from graft.hub.index import Fingerprint, now_ns
        from graft.hub.tensors import read_checked

        try:
            recorded = stored.deferred if stored.deferred is not None else {}
            fresh = read_checked(self.blob_file, manifest, recorded, alloc, now_ns,
                                 Fingerprint, mapped)
        except IntegrityError as exc:
            raise IntegrityError(f"stored module {stored.handle} ({stored.digest}) is damaged: "
                                 f"{exc}. Run `graft verify {stored.handle}` for a full check, "
                                 "and add the module again from its source to repair it") \
                from None
        recorded.update(fresh)
        index.record_fingerprints(self._index, stored.digest, fresh,
                                  pack=recorded if fresh or stored.repack else None)

    def verify(self, handle: str | Handle) -> StoredModule:
        """Like :meth:`resolve`, but hash every file against the manifest.

        Raises:
            ModuleNotFound: no such module is stored.
            IntegrityError: a stored file was altered, truncated or lost.
        """
        stored = self._find(store_handle(handle, "verify"))
        self._check(stored, level="full", recorded={}, packed=False)
        return stored

    def tensor_blobs(self, stored: StoredModule, manifest: Manifest
                     ) -> dict[str, str] | None:
        """Where each tensor of a module just opened (:meth:`open`) lives: tensor name ->
        its blob, whose bytes are the tensor's little-endian C-order bytes, with dtype and
        shape as the manifest records (hub/tensors.py). ``open`` checked the blobs.

        Returns:
            None for a tree that holds a whole ``weights.safetensors`` (stored before
            tensor-level storage): read that file instead.
        """
        if not is_split(stored.path):
            return None
        return {name: self.blob_file(entry.sha256) for name, entry in manifest.tensors.items()}
    def list(self, *, check: bool = False) -> list[StoredModule]:
        """Every stored module, sorted by name, then version (numerically).

        Args:
            check: Also check each tree cheaply (its graft.json digest and file sizes) and
                say in ``damage`` what is wrong; one damaged module never fails the listing.
        """
        found = [self._stored(r) for r in self._read("SELECT * FROM modules")]
        if check:
            found = [m if m.damage else dataclasses.replace(m, damage=self._damage(m))
                     for m in found]
        return sorted(found, key=lambda m: (m.name, version_key(m.version), m.created))

    def __contains__(self, handle: object) -> bool:
        """Whether a store handle names an indexed module (no check of its files)."""
        try:
            self._find(store_handle(handle, "contains"))  # type: ignore[arg-type]
        except (ModuleNotFound, HandleError):
            return False
        return True

    def _find(self, handle: Handle, *, exact: bool = False,
              conn: sqlite3.Connection | None = None) -> StoredModule:
        def query(sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
            return conn.execute(sql, params).fetchall() if conn else self._read(sql, params)

        return find(self, handle, query, exact=exact)

    def _find_with_fingerprints(self, handle: Handle
                                ) -> tuple[StoredModule, dict[str, index.Fingerprint], bool,
                                           str | None]:
        """The module a handle names, its recorded fingerprints (and whether they came from
        its packed row) and weights header (hex sha256; None when not recorded), on one
        connection."""
        def work(query: Callable[..., list[Any]]) -> Any:
            stored = find(self, handle, query)
            return (stored, *index.fingerprints(query, stored.digest),
                    index.header_of(query, stored.digest))

        return self._reading(work)

    def _damage(self, stored: StoredModule, *, level: str = "sizes") -> str | None:
        """Why the stored tree does not match its index row (None when it does)."""
        try:
            check_tree(stored.path, stored.digest, {}, level=level, blob_file=self.blob_file)
        except (GraftError, OSError) as exc:
            return str(exc)
        return None

    def _check(self, stored: StoredModule, *, level: str,
               recorded: dict[str, index.Fingerprint], header: str | None = None,
               defer: bool = False, packed: bool) -> tuple[Manifest, bool]:
        """Check the tree (trees.check_tree) and record what it hashed; ``recorded`` gains
        those fingerprints. Returns the manifest and whether anything was hashed.

        The module's packed fingerprints are rewritten when they were not ``packed`` or a
        blob was hashed, unless ``defer`` leaves that to :meth:`read_tensors`."""
        try:
            manifest, fresh = check_tree(stored.path, stored.digest, recorded, level=level,
                                         blob_file=self.blob_file, header_sha256=header,
                                         defer_blobs=defer)
        except (GraftError, OSError) as exc:
            damage = str(exc)
        else:
            recorded.update(fresh)
            repack = not defer and (bool(fresh) or not packed)
            index.record_fingerprints(self._index, stored.digest, fresh,
                                      pack=recorded if repack else None)
            return manifest, bool(fresh)
        if not self._read("SELECT 1 FROM modules WHERE digest = ?", (stored.digest,)):
            raise ModuleNotFound(f"{stored.handle} was removed from the local store at "
                                 f"{self.root} while being read; {HOW_TO_ADD}")
        raise IntegrityError(f"stored module {stored.handle} ({stored.digest}) at {stored.path} "
                             f"is damaged: {damage}. Run `graft verify {stored.handle}` for a "
                             "full check, and add the module again from its source "
                             "(`graft add DIR` or `graft import NAME`) to repair it")
