"""The store's ``tmp/`` area: work folders of writers, staging folders, and reaping both.

Two kinds of entries, told apart by prefix:

- ``add-<pid>-<hex>``: a writer's work folder, created only while the writer lock is held.
  Whoever holds the lock next may delete any it finds: their writer died.
- ``stage-<pid>-<hex>`` with ``stage-<pid>-<hex>.lock``: a folder handed out by
  ``Store.staging()``. Its process holds an ``flock`` on the lock file while the folder is in
  use; the kernel drops that lock when the process dies, however it dies, so a reaper that can
  take the lock knows the folder is abandoned.

Anything else in ``tmp/`` is deleted once it is older than ten minutes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # Windows: staging directories are then reaped by age only
    fcntl = None  # type: ignore[assignment]

__all__ = ["ADD_PREFIX", "STAGE_PREFIX", "entries", "hold", "new_work", "reap", "remove",
           "rmtree", "staging", "suppress_os_error", "unheld"]

ADD_PREFIX = "add-"
STAGE_PREFIX = "stage-"
_STALE_AFTER = 600.0  # seconds after which an unrecognised tmp entry counts as abandoned
_STAGING_MAX_AGE = 24 * 3600.0  # without flock, a staging folder is reaped after a day


def new_work(tmp: Path) -> Path:
    """A fresh work folder in ``tmp``; the caller holds the writer lock."""
    path = tmp / f"{ADD_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
    path.mkdir()
    return path


@contextlib.contextmanager
def staging(tmp: Path) -> Iterator[Path]:
    """A fresh empty staging folder in ``tmp``, held (against reaping) until exit, then
    removed."""
    name = f"{STAGE_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
    lock = tmp / f"{name}.lock"
    fd = hold(lock)
    entry = tmp / name
    try:
        entry.mkdir()
        yield entry
    finally:
        rmtree(entry)
        lock.unlink(missing_ok=True)  # still held: a reaper cannot be removing it now
        os.close(fd)


def hold(lock: Path, *, shared: bool = False) -> int:
    """Create (if needed) and lock a lock file; return its descriptor (closing it unlocks).

    Args:
        shared: Take a shared lock (several holders), else an exclusive one.
    """
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return fd
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)  # waits only on a probe
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # a reaper deleted the file between our open and lock: start again


def unheld(lock: Path) -> int | None:
    """An exclusive, non-blocking lock on an existing lock file: its descriptor if nobody
    holds the file, None if a live process does. A missing file counts as unheld (returns -1).
    """
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return -1
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            return None
        raise
    return fd


def reap(tmp: Path, entry: Path) -> tuple[int, int]:
    """Remove one tmp entry if its writer is gone: (entries removed, bytes freed). The caller
    holds the writer lock."""
    name = entry.name
    if name.startswith(ADD_PREFIX):
        return 1, remove(entry)  # created only under the writer lock, which we hold
    if name.startswith(STAGE_PREFIX):
        if name.endswith(".lock"):
            if (tmp / name.removesuffix(".lock")).exists():
                return 0, 0  # judged with its directory
            return _reap_staging(entry, None)
        return _reap_staging(tmp / f"{name}.lock", entry)
    try:
        age = time.time() - entry.lstat().st_mtime
    except FileNotFoundError:
        return 0, 0
    return (1, remove(entry)) if age > _STALE_AFTER else (0, 0)


def _reap_staging(lock: Path, directory: Path | None) -> tuple[int, int]:
    fd = unheld(lock)
    if fd is None:
        return 0, 0  # its process is alive
    if fd == -1:  # the directory outlived its lock file: the owner is gone
        return (1, remove(directory)) if directory is not None else (0, 0)
    try:
        if fcntl is None and time.time() - os.fstat(fd).st_mtime < _STAGING_MAX_AGE:
            return 0, 0
        freed = remove(directory) if directory is not None else 0
        lock.unlink(missing_ok=True)
        return 1, freed
    finally:
        os.close(fd)


def entries(folder: Path) -> list[Path]:
    """The entries of ``folder``, sorted; none if it does not exist."""
    try:
        return sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def remove(path: Path) -> int:
    """Delete a file or tree; return the bytes this gives back (files with no other link)."""
    freed = 0
    try:
        if path.is_dir() and not path.is_symlink():
            for folder, _, files in os.walk(path):
                for name in files:
                    with suppress_os_error():
                        st = os.lstat(os.path.join(folder, name))
                        freed += st.st_size if st.st_nlink == 1 else 0
            rmtree(path)
        else:
            st = path.lstat()
            path.unlink()
            freed = st.st_size if st.st_nlink == 1 else 0
    except FileNotFoundError:
        return 0
    return freed


def rmtree(path: Path) -> None:
    """Delete a tree, read-only files included; a missing tree is fine."""
    def retry_writable(function: Any, name: str, _: Any) -> None:
        # read-only files refuse deletion on some platforms
        with suppress_os_error():
            os.chmod(name, stat.S_IWRITE | stat.S_IREAD)
            function(name)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry_writable)
    else:
        shutil.rmtree(path, onerror=retry_writable)


@contextlib.contextmanager
def suppress_os_error() -> Iterator[None]:
    """Ignore an ``OSError`` (best-effort cleanup)."""
    try:
        yield
    except OSError:
        pass
