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

import os
import sqlite3
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from graft._testing import stop_point
from graft.errors import FormatError, ModuleNotFound, VersionConflict
from graft._sqlite import transaction
from graft.format.manifest import MANIFEST_NAME, Manifest
from graft.hub import index, staging
from graft.hub.gc import GcReport, collect, delete_unused_tree
from graft.hub.blobs import check_sources, open_regular
from graft.hub.directory import write_directory
from graft.hub.install import install
from graft.hub.handles import Handle
from graft.hub.lookup import store_handle
from graft.hub.tensors import is_split
from graft.hub.reading import StoreReading
from graft.hub.storeroot import StoredModule

__all__ = ["GcReport", "Store", "StoredModule"]


class Store(StoreReading):
    """The local module store: the reads (hub/reading.py), and the writes.

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

    # -- writing out ------------------------------------------------------------------------

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


# -- helpers -------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
