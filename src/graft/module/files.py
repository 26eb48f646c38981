"""File-level helpers for writing modules durably and refusing content that could run code."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Callable, Iterator

from graft.errors import UnsafeContentError

__all__ = ["fsync_dir", "fsync_tree", "refuse_code_or_pickle", "writer"]

# Suffixes of files that are code, or containers that unpickle when opened the usual way.
_REFUSED_SUFFIXES = {".py", ".pyc", ".pyo", ".so", ".dll", ".dylib", ".pkl", ".pickle",
                     ".pt", ".pth", ".pt2", ".ckpt", ".joblib"}
# Pickle protocol 0/1 streams open with a GLOBAL opcode: "c<module>\n<name>\n".
_PICKLE_TEXT = re.compile(rb"^\(?c[\w.]+\n[\w.]+\n")


def refuse_code_or_pickle(rel: str, head: bytes) -> None:
    """Raise ``UnsafeContentError`` if a module file is code or a pickle, by name or content.

    Args:
        rel: The file's path inside the module.
        head: Its first bytes (64 are plenty).
    """
    suffix = Path(rel).suffix.lower()
    reason = None
    if suffix in _REFUSED_SUFFIXES:
        reason = f"its type ({suffix}) is code or a pickle container"
    elif len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5:
        reason = "it is a pickle stream (protocol header 0x80)"
    elif _PICKLE_TEXT.match(head):
        reason = "it is a pickle stream (GLOBAL opcode)"
    elif head.startswith(b"PK\x03\x04") and b".pkl" in head:
        reason = "it is a zip archive holding a pickle (a torch .pt/.pt2 file)"
    if reason:
        raise UnsafeContentError(f"module file {rel!r} is refused: {reason}. Modules hold "
                                 "only JSON, safetensors and plain data, so that loading one "
                                 "never runs code")


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``."""
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


@contextlib.contextmanager
def writer(root: Path) -> Iterator[Callable[[str, bytes], Path]]:
    """Yield ``put(rel, data) -> path``, which writes a file under ``root`` and fsyncs it."""

    def put(rel: str, data: bytes) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return path

    yield put
