"""File-system helpers shared by every layer: hashing, fsync, atomic writes and replaces.

Every durable write in Graft goes through here, so there is one place that says what "atomic"
means: write a temporary file next to the target, fsync it, rename it over the target, fsync
the directory. A crash leaves either the old bytes or the new ones, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

__all__ = [
    "atomic_write",
    "fsync_dir",
    "fsync_tree",
    "replace_dir",
    "sha256_bytes",
    "sha256_file",
    "sha256_stream",
    "writer",
]

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    """The hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_stream(stream: BinaryIO, chunk: int = _CHUNK) -> str:
    """The hex sha256 of everything left in a binary stream, read in chunks."""
    digest = hashlib.sha256()
    while block := stream.read(chunk):
        digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return sha256_stream(f)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and directory under ``root``."""
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Replace the file ``path`` with ``data`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "xb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def replace_dir(staging: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Move a complete, fsynced ``staging`` directory to ``target`` in one rename.

    ``target`` must not exist (modules and checkpoints are never overwritten in place); the
    parent directory is fsynced so the new name survives a crash.
    """
    staging, target = Path(staging), Path(target)
    fsync_tree(staging)
    os.rename(staging, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def writer(root: Path) -> Iterator[Callable[[str, bytes], Path]]:
    """Yield ``put(rel, data) -> path``, which writes a new file under ``root`` and fsyncs it."""

    def put(rel: str, data: bytes) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return path

    yield put
