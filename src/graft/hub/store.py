"""The local store: the embedded default hub.

Layout under the root (``$GRAFT_HOME``, default ``~/.cache/graft``)::

    blobs/sha256/<2 hex>/<hex>   content-addressed blobs, read-only: files (hub/blobs.py),
                                 and each tensor and safetensors header of the weights
                                 (hub/tensors.py) and reference files (hub/tensorfiles.py)
    modules/<digest hex>/        one tree per module: hard links to its file blobs (copies
                                 where links fail), its graft.json, the link to its weights
                                 header and the record of its reference files' blobs; not a
                                 module directory (see Store.export)
    index.sqlite                 which modules are stored, their blobs, and what was removed
                                 (hub/index.py)
    leases/<digest hex>          a shared flock per process that has the module loaded
    tmp/                         work and staging folders (hub/staging.py)
    lock                         held by every writer

Writers take the lock and publish in an order that keeps every state a reader can reach
complete: blobs first (temp file, fsync, rename), then the module tree (one rename), then the
index row, in one transaction. Removal takes the row out first, and deletes the tree only
when no process holds its lease. Readers never take the writer lock; they check the tree on
every read (docs/store.md says how), and an index that is lost or corrupt is rebuilt from the
trees, each validated again.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from graft._testing import stop_point
from graft.errors import (
    FormatError,
    GraftError,
    HandleError,
    IntegrityError,
    ModuleNotFound,
    VersionConflict,
)
from graft._sqlite import transaction
from graft.format.manifest import MANIFEST_NAME, Manifest
from graft.hub import index, leases, staging
from graft.hub.gc import GcReport, collect, delete_unused_tree
from graft.hub.blobs import check_sources, open_regular
from graft.hub.directory import write_directory
from graft.hub.install import install
from graft.hub.handles import Handle
from graft.hub.lookup import HOW_TO_ADD, find, hex_of, store_handle, version_key
from graft.hub.tensors import is_split
from graft.hub.storeroot import StoreRoot, StoredModule
from graft.hub.trees import check_tree

__all__ = ["GcReport", "Store", "StoredModule"]


class Store(StoreRoot):
    """The local module store.

    Args:
        root: Its directory; default ``graft.settings.graft_home()``. Nothing is created until
            the first write.
    """

    # -- writing ---------------------------------------------------------------------------

    def add(self, directory: str | os.PathLike[str]) -> StoredModule:
        """Copy a module directory into the store.

        Every file is checked against the manifest (type, size and sha256) and every program
        is validated before anything is written. Adding a module that is already stored
        returns the stored entry, and repairs the stored copy first if it was damaged.

        Args:
            directory: A module directory (holding ``graft.json``). Only ``graft.json`` and the
                files its manifest lists are taken.

        Raises:
            ModuleNotFound: ``directory`` is not a module directory.
            IntegrityError: a file is missing, truncated or altered.
            UnsafeContentError: a listed file is a link, a FIFO, a device or another special
                file, is hard linked from outside the directory, or is code or a pickle.
            VersionConflict: another module is stored under the same name and version.
        """
        source = Path(directory).expanduser()
        if not source.is_dir():
            raise ModuleNotFound(f"add: {str(source)!r} is not a directory; pass a module "
                                 f"directory (one holding {MANIFEST_NAME})")
        if (source / MANIFEST_NAME).exists() or (source / MANIFEST_NAME).is_symlink():
            open_regular(source, MANIFEST_NAME).close()  # never block on a FIFO
        manifest = Manifest.read(source)
        if MANIFEST_NAME in manifest.files:
            raise FormatError(f"{source / MANIFEST_NAME} lists {MANIFEST_NAME} among its own "
                              "files; the manifest cannot record its own digest")
        # Types first (opening a FIFO or a device to hash it would block or never end), then
        # every byte and program: a module in the store needs neither check again.
        from graft.format.validate import check_module  # the program reader: only writers

        check_sources(source, manifest.files)
        check_module(source, manifest, hash_contents=True)
        stop_point("add.checked")
        return self._install(manifest, lambda conn, repairing: install(
            self, source, manifest, conn, repairing=repairing))

    def add_blobs(self, manifest: Manifest, layouts: Mapping[str, Any],
                  sources: Mapping[str, Any], fetch: Callable[..., Any], *,
                  fresh: Iterable[str] = (), checked_programs: Iterable[str] = ()
                  ) -> StoredModule:
        """Add a module from the blobs it was sent as (what ``graft pull`` downloaded), with
        the checks of :meth:`add` (hub/assemble.py): each blob is linked into the store, not
        copied, and the module is visible only once all of it is there.

        Args:
            manifest: Its manifest (the caller checked the digest it was asked for).
            layouts: Each safetensors file sent as a header and tensor blobs: its
                ``tensorfiles.FileLayout``.
            sources: Hex sha256 -> ``(file, start, end)`` holding that blob's bytes.
            fetch: Gets ``[(hex sha256, size)]`` that no source holds intact: hex -> file.
            fresh: Blobs whose sources are the caller's own files, hashed a moment ago (a
                pull's downloads): handed over, they are linked in rather than copied.
            checked_programs: sha256s of program files ``check_programs`` already passed
                for this manifest (a pull checks them while the rest downloads).

        Raises:
            IntegrityError / FormatError: the blobs are not that module.
            VersionConflict: another module is stored under the same name and version.
        """
        from graft.hub.assemble import install_blobs

        fresh, checked = frozenset(fresh), frozenset(checked_programs)
        return self._install(manifest, lambda conn, repairing: install_blobs(
            self, manifest, layouts, sources, fresh, fetch, conn, repairing=repairing,
            checked_programs=checked))

    def _install(self, manifest: Manifest,
                 write: Callable[[sqlite3.Connection, bool], str]) -> StoredModule:
        """Run ``write(conn, repairing)`` under the writer lock unless the module is stored
        intact; refuse a second module under one name and version."""
        with self._writer() as conn:
            row = conn.execute("SELECT * FROM modules WHERE digest = ?",
                               (manifest.digest,)).fetchone()
            if row is not None:
                stored = self._stored(row)
                if self._damage(stored, level="full") is not None:
                    write(conn, True)
                return stored
            clash = conn.execute("SELECT digest FROM modules WHERE name = ? AND version = ?",
                                 (manifest.name, manifest.version)).fetchone()
            if clash is not None:
                raise VersionConflict(index.conflict_message(manifest, clash["digest"]))
            created = write(conn, False)
            return StoredModule(name=manifest.name, version=manifest.version,
                                digest=manifest.digest, path=self.module_path(manifest.digest),
                                created=created, size=manifest.size,
                                parents=tuple(manifest.parents))

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh empty directory inside the store's ``tmp/``, removed on exit.

        Write a module there, then :meth:`add` it. :meth:`gc`, from any process, leaves the
        directory alone for as long as this context is open, and reaps it if the process dies.
        """
        self._make_dirs()
        with staging.staging(self._tmp) as entry:
            yield entry

    def remove(self, handle: str | Handle) -> StoredModule:
        """Take a module out of the index and delete its tree, unless a process has it loaded
        (then :meth:`gc` deletes the tree once none has); its blobs stay until :meth:`gc`.

        Args:
            handle: ``name@version`` or ``name@sha256:<hex>``; a bare ``name`` only when a
                single version of it is stored.

        Raises:
            ModuleNotFound: no such module is stored.
            HandleError: a bare name matches several versions.
        """
        wanted = store_handle(handle, "remove")
        self._find(wanted, exact=True)  # fail before creating anything
        with self._writer() as conn:
            stored = self._find(wanted, exact=True, conn=conn)
            with transaction(conn):
                index.delete_module(conn, stored.digest, _now())
            stop_point("rm.unindexed")
            delete_unused_tree(self, conn, stored.digest)
        return stored

    def gc(self, *, downloads: bool = False) -> GcReport:
        """Delete what no indexed module needs: unreferenced blobs, trees of removed modules
        that no process uses any more, ``tmp/`` entries whose writer is gone, and registry
        downloads (``oci-cache/``) no pull needs: those the store holds, and the rest once
        untouched for a week (``hub.oci.cache.RESUME_WINDOW``), while no pull is running.

        A tree without an index row that was not removed on purpose (an add killed after
        publishing its tree, a lost row) is validated and indexed again, never deleted.

        Args:
            downloads: Delete every partial or finished download at once (an interrupted
                pull then starts its blobs over).
        """
        self._check_root()
        if not self.root.exists():
            return GcReport(0, 0, 0, 0)
        with self._writer() as conn:
            return collect(self, conn, downloads=downloads)

    def rebuild_index(self) -> list[StoredModule]:
        """Rebuild the index from the module trees, validating each completely, and return
        what it holds. The old index is kept beside it as ``index.sqlite.damaged-*``.

        Removal records are lost with the old index, so a module removed while still in use
        comes back; remove it again.
        """
        with self._writer(rebuild=True):
            pass
        return self.list()

    # -- reading ---------------------------------------------------------------------------

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

    def export(self, handle: str | Handle, directory: str | os.PathLike[str]) -> Path:
        """Write a stored module out as an ordinary module directory: ``graft.json``, its
        files, and ``weights.safetensors`` rebuilt from the tensor blobs, byte for byte the
        file the module was added with (checked against the manifest's ``sha256``).

        Args:
            handle: A store handle.
            directory: Where to write it; must not exist yet (it appears complete, in one
                rename, or not at all).

        Raises:
            ModuleNotFound: no such module is stored.
            IntegrityError: a stored file or blob is damaged.
            StoreError: ``directory`` exists or cannot be written.
        """
        return write_directory(self, handle, directory)

    @contextmanager
    def exported(self, handle: str | Handle) -> Iterator[Path]:
        """A stored module as a full module directory in the store's ``tmp/`` (see
        :meth:`export`), removed on exit: for tools that read a module directory."""
        with self.staging() as stage:
            yield self.export(handle, stage / "module")

    def files_on_demand(self, stored: StoredModule) -> Any:
        """A :class:`~graft.hub.ondemand.ExportOnDemand` of a module whose tree is not a
        complete module directory (its weights or reference files are blobs), for a loaded
        module's ``directory``; None for a tree that holds every file whole."""
        from graft.hub.ondemand import ExportOnDemand
        from graft.hub.tensorfiles import RECORD

        if not is_split(stored.path) and not os.path.lexists(stored.path / RECORD):
            return None
        return ExportOnDemand(self, stored.pinned_handle)

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


# -- helpers -------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
