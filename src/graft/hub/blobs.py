"""Content-addressed blobs, and reading the files that become them without trusting their type.

Every file of a stored module is a blob ``blobs/sha256/<2 hex>/<hex>``, written once
(temporary file, fsync, rename) and read-only afterwards; module trees hard-link to them.

A module directory being added is untrusted: where the manifest lists a file there may be a
FIFO (reading it blocks forever), a device (``/dev/zero`` reads forever), a directory, a
symbolic link, or a hard link to a file outside the module (copying it would put someone
else's file, say ``~/.ssh/id_rsa``, in the store). Every file is opened with
:func:`open_regular`, which follows no link and never blocks, and checked on the open
descriptor, so what is checked is what is read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path
from typing import BinaryIO, Iterable

from graft._fs import fsync_dir, sha256_file
from graft.errors import IntegrityError, UnsafeContentError
from graft.format import files
from graft.format.entries import FileEntry
from graft.format.manifest import resolve_inside

__all__ = ["check_sources", "copy_checked", "link_or_copy", "open_regular", "place_blob",
           "publish"]

_CHUNK = 4 << 20
_READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH


def open_regular(root: Path, rel: str, *, resolved: bool = False) -> BinaryIO:
    """Open the module file ``rel`` under ``root`` for reading, refusing anything but a
    regular file reached without links (``graft.format.files.open_regular``: ``O_NOFOLLOW |
    O_NONBLOCK``, then ``fstat`` of what was opened, so a FIFO never blocks and what is
    checked is what is read). ``resolved``: ``root`` is already ``Path.resolve()``'s answer
    (a caller opening many files of one tree resolves it once).

    Raises:
        UnsafeContentError: a component is a link, or the file is not a regular file.
        IntegrityError: the file is missing.
    """
    try:
        return files.open_regular(resolve_inside(root if resolved else root.resolve(), rel),
                                  what=f"module file {rel!r}")
    except FileNotFoundError:
        raise IntegrityError(f"the module is missing {rel}; re-export or re-fetch it") from None
    except NotADirectoryError:
        raise UnsafeContentError(f"module file {rel!r} lies below something that is not a "
                                 "directory") from None


def check_sources(root: Path, names: Iterable[str]) -> None:
    """Check that every listed file is a regular file of the module and no other's.

    A hard link is refused when some of its names lie outside the module (its link count is
    higher than the number of listed paths that share its inode): the same bytes would then
    be reachable, and changeable, from elsewhere, and a link to a private file would copy it
    into the store.

    Raises:
        UnsafeContentError: a file is not regular, is reached through a link, or is hard
            linked from outside the module.
        IntegrityError: a file is missing.
    """
    seen: dict[tuple[int, int], list[str]] = {}
    links: dict[tuple[int, int], int] = {}
    for rel in names:
        with open_regular(root, rel) as f:
            st = os.fstat(f.fileno())
        seen.setdefault((st.st_dev, st.st_ino), []).append(rel)
        links[(st.st_dev, st.st_ino)] = st.st_nlink
    for key, names in seen.items():
        if links[key] > len(names):
            raise UnsafeContentError(
                f"module file {names[0]!r} is a hard link with {links[key] - len(names)} more "
                f"name(s) outside the module; a module's files must be its own. Copy the "
                f"directory (e.g. `cp -r`) and add the copy")


def copy_checked(root: Path, rel: str, entry: FileEntry, dest: Path) -> None:
    """Copy the module file ``rel`` to a new file ``dest``, hashing on the way; fsync it and
    make it read-only.

    Raises:
        IntegrityError: the bytes read differ from ``entry`` (the file changed since it was
            checked).
        UnsafeContentError: the file is not a regular file (see :func:`open_regular`).
    """
    digest = hashlib.sha256()
    size = 0
    with open_regular(root, rel) as src, open(dest, "xb") as out:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if size > entry.size:  # a file that keeps growing is not the listed one
                break
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if size != entry.size or digest.hexdigest() != entry.sha256:
        raise IntegrityError(f"{rel} changed while it was being added ({size} bytes read, "
                             f"{entry.size} in the manifest); finish writing the module, then "
                             "add it again")
    os.chmod(dest, _READ_ONLY)


def place_blob(blob: Path, root: Path, rel: str, entry: FileEntry, work: Path) -> bool:
    """Make sure ``blob`` holds the bytes of ``entry``, copying them from the module file
    ``rel`` under ``root`` if it is absent or damaged.

    Returns:
        True when this call created the blob (so a failed add takes it back).
    """
    try:
        size = blob.stat().st_size
    except FileNotFoundError:
        size = None
    if size == entry.size and sha256_file(blob) == entry.sha256:
        return False
    blob.parent.mkdir(parents=True, exist_ok=True)
    part = work / f"{entry.sha256}.part"
    copy_checked(root, rel, entry, part)
    publish(part, blob)
    return size is None


def link_or_copy(blob: Path, dest: Path) -> None:
    """Make ``dest`` a hard link to ``blob``, or a read-only copy where links fail."""
    try:
        os.link(blob, dest)
    except OSError:  # no hard links here (or too many): a copy does the same job
        shutil.copyfile(blob, dest)
        with open(dest, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(dest, _READ_ONLY)


def publish(source: Path, dest: Path) -> None:
    """Atomically move a finished file or tree into place and make the rename durable."""
    os.replace(source, dest)
    try:
        fsync_dir(dest.parent)
    except OSError:  # directories cannot be fsynced on every platform
        pass
