"""A stored module written out as an ordinary module directory (``Store.export``).

A tree in the store is not a module directory: its weights and reference files are tensor
blobs. Exporting rebuilds each of those files from its blobs, byte for byte the file the
module was added with, each checked against the manifest's ``sha256`` as it is written. The
directory is written beside the target under a hidden name and renamed into place, so it
appears complete or not at all.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from graft.errors import StoreError
from graft.format.manifest import Manifest
from graft.hub import staging, tensorfiles
from graft.hub.storeroot import StoredModule
from graft.hub.tensors import WEIGHTS, is_split, read_layout, write_weights

__all__ = ["write_directory"]


def write_directory(store: Any, handle: Any, directory: str | os.PathLike[str]) -> Path:
    """Export the module ``handle`` names from ``store`` to ``directory`` (see
    ``Store.export``, which documents the errors)."""
    target = Path(directory).expanduser().absolute()
    if target.exists() or target.is_symlink():
        raise StoreError(f"export: {target} already exists; pass a new directory")
    stored, manifest = store.open(handle)
    try:
        work = target.with_name(f".{target.name}.export-{os.getpid()}")
        staging.rmtree(work)  # a leftover of an export killed in this process's pid
        _write(store, stored, manifest, work)
        os.rename(work, target)
    except OSError as exc:
        with staging.suppress_os_error():
            staging.rmtree(work)
        raise StoreError(f"export: cannot write {target}: {exc}") from None
    except BaseException:
        with staging.suppress_os_error():
            staging.rmtree(work)
        raise
    finally:
        if stored.lease is not None:
            stored.lease.close()
    return target


def _write(store: Any, stored: StoredModule, manifest: Manifest, work: Path) -> None:
    work.mkdir()
    split = tensorfiles.read_record(stored.path, manifest)
    for rel in manifest.files:
        dest = work / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel == WEIGHTS and is_split(stored.path):
            write_weights(store.blob_path, read_layout(stored.path, manifest), dest,
                          manifest.files[rel].sha256, read_only=False)
        elif rel in split:
            tensorfiles.rebuild(store.blob_path, rel, split[rel], dest,
                                manifest.files[rel].sha256)
        else:
            shutil.copyfile(stored.path / rel, dest)
    manifest.write(work)
