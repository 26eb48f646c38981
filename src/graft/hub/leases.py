"""Leases: how ``rm`` and ``gc`` know that a process still uses a module's tree.

A process that opens a module from the store takes a shared ``flock`` on
``leases/<digest hex>`` and keeps it for as long as the loaded module lives (the loader keeps
the lease on the module). Removing a module takes its index row out first, then tries an
exclusive lock on the lease without waiting: if that fails a live process has the module
loaded, and the tree stays (its lazily read programs and assets must stay readable) until a
later ``gc`` finds the lease free. The kernel drops a dead process's lock, however it died.
"""

from __future__ import annotations

import os
from pathlib import Path

from graft.hub import staging

__all__ = ["Lease", "reap", "take"]


class Lease:
    """A shared lock on one module's lease file, released by :meth:`close`, by garbage
    collection of this object, or by the death of the process."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def close(self) -> None:
        """Release the lease."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    # A copied module (copy.deepcopy, as EMA and best-model keeping do) holds the lease
    # too: through its own duplicate of the descriptor, so that each copy closes only its
    # own (a shared copy of the number would close it twice, the second time perhaps
    # another file's). The lock belongs to the open file, so it lasts while any copy lives.
    def __copy__(self) -> Lease:
        return Lease(os.dup(self._fd) if self._fd >= 0 else -1)

    def __deepcopy__(self, memo: dict[int, object]) -> Lease:
        return self.__copy__()

    # A descriptor means nothing in another process: a module unpickled there holds none.
    def __getstate__(self) -> dict[str, int]:
        return {"_fd": -1}


def take(path: Path) -> Lease | None:
    """A shared lease on ``path`` for this process; None where it cannot be created (a
    read-only store: then nothing can remove the module either)."""
    try:
        path.parent.mkdir(exist_ok=True)  # a store written before leases existed
        return Lease(staging.hold(path, shared=True))
    except OSError:
        return None


def reap(leases: Path, modules: Path) -> None:
    """Delete lease files of modules that have no tree, unless a process holds them. The
    caller holds the writer lock."""
    for lease in staging.entries(leases):
        if (modules / lease.name).exists():
            continue
        fd = staging.unheld(lease)
        if fd is not None and fd >= 0:
            lease.unlink(missing_ok=True)  # while we hold it: a waiting reader retries
            os.close(fd)
