"""Refusing module files that are code or pickles, wherever they sit (no torch).

The rule (docs/format.md): a module holds no code and nothing that unpickles. A file is
refused when its name says code or pickle (``.py``, ``.pkl``, ``.pt``, ...), or when its
bytes are one, whatever its name:

- a pickle stream: a protocol header (``0x80 0x01..0x05``), or opcodes from the first byte
  on that an unpickler would run up to a call (``REDUCE``, ``BUILD``, ``INST``, ``OBJ``,
  ``NEWOBJ``, ``PERSID``) or up to ``STOP`` after an import (``GLOBAL``, ``STACK_GLOBAL``).
  The stream is only decoded (``pickletools.genops``) with the unpickler's stack and marks
  simulated, never executed, and it is followed past any prefix: padding before the payload
  does not hide it. Plain text whose first bytes happen to be opcodes (``cat\\ndog\\n``)
  breaks the stack within a few opcodes and is accepted;
- a zip archive holding code or a pickle (a torch ``.pt`` file): the central directory is
  read, wherever it lies, and every local file header in the file is scanned as well, so an
  entry past a sniffed prefix or missing from the directory is still seen;
- a ``.safetensors`` file that is not a safetensors file (``tensorfile``): its header is
  parsed and bounds-checked before any other reader touches it.

Files are opened without following links and without blocking, and only regular files are
read: a FIFO, a device or a directory where a file should be is refused.
"""

from __future__ import annotations

# pickletools decodes UNICODE arguments with this codec: imported here, so that scanning a
# file never imports anything (the hostile-corpus test's audit hook would see it).
import encodings.raw_unicode_escape  # noqa: F401
import io
import mmap
import os
import pickletools
import stat
import struct
import zipfile
from pathlib import PurePosixPath
from typing import BinaryIO

from graft.errors import FormatError, UnsafeContentError
from graft.format.limits import MAX_PICKLE_SCAN_OPS, MAX_ZIP_ENTRIES

__all__ = ["REFUSED_SUFFIXES", "SNIFF_BYTES", "check_file", "open_regular", "read_regular",
           "refuse_code_or_pickle"]

#: Suffixes of files that are code, or containers that unpickle when opened the usual way.
REFUSED_SUFFIXES = frozenset({".py", ".pyc", ".pyo", ".pyw", ".so", ".dll", ".dylib", ".pkl",
                              ".pickle", ".pt", ".pth", ".pt2", ".ckpt", ".joblib", ".bin"})
# ".bin" is refused inside archives only (pytorch_model.bin is a torch zip or pickle), not as a
# module file: plain binary assets may use it.
_MODULE_REFUSED = REFUSED_SUFFIXES - {".bin"}
#: How many leading bytes callers that hold a file in memory pass (kept for callers).
SNIFF_BYTES = 1 << 20
# Opcodes through which an unpickler calls something, and through which it imports.
_CALLS = {"REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "PERSID", "BINPERSID"}
_IMPORTS = {"GLOBAL", "STACK_GLOBAL", "EXT1", "EXT2", "EXT4", "INST"}
_MARK = object()
_ITEM = object()
_LOCAL_HEADER = b"PK\x03\x04"
_END_OF_DIRECTORY = b"PK\x05\x06"
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def _kind(mode: int) -> str:
    for test, name in _FILE_KINDS:
        if test(mode):
            return name
    return "a special file"


def open_regular(path: str | os.PathLike[str], *, what: str) -> BinaryIO:
    """Open a file for reading only if it is a regular file; never block, never follow links.

    A FIFO opened for reading blocks until a writer appears, and a device can be read
    forever: both are refused from ``lstat`` before opening, and from ``fstat`` of what was
    opened (``O_NONBLOCK | O_NOFOLLOW``), so a swap in between is caught too.

    Raises:
        FileNotFoundError: nothing is there.
        UnsafeContentError: it is a link, a FIFO, a device, a socket or a directory.
    """
    def refuse(mode: int) -> UnsafeContentError:
        return UnsafeContentError(f"{what} is {_kind(mode)}, not a regular file; a module "
                                  "(and an input file) may only be a regular file")

    before = os.lstat(path)
    if not stat.S_ISREG(before.st_mode):
        raise refuse(before.st_mode)
    flags = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise UnsafeContentError(f"{what} cannot be opened as a regular file ({exc.strerror})"
                                 ) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise refuse(mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str], *, what: str, max_bytes: int) -> bytes:
    """Read a whole regular file of at most ``max_bytes`` (see ``open_regular``).

    Raises:
        FormatError: the file is larger than ``max_bytes``.
    """
    with open_regular(path, what=what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise FormatError(f"{what} is {size} bytes, over the limit of {max_bytes}; the "
                              "file is corrupt or hostile")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while being read
        raise FormatError(f"{what} is over the limit of {max_bytes} bytes")
    return data


# -- pickles ---------------------------------------------------------------------------------


def _pickle_reason(stream: BinaryIO) -> str | None:
    """Why ``stream`` (from its first byte) is a pickle that imports or calls, or None.

    The unpickler's stack and mark stack are simulated from the opcodes' documented stack
    effects: a call is counted only where the real unpickler would reach it with its operands
    in place. Streams that follow one another (``pickle.load`` called again) are all read.
    """
    ops = 0
    while True:
        start = stream.tell()
        stack: list[object] = []
        imported = False
        try:
            for opcode, _, _ in pickletools.genops(stream):
                ops += 1
                if ops > MAX_PICKLE_SCAN_OPS:
                    return f"it decodes as over {MAX_PICKLE_SCAN_OPS} pickle opcodes"
                before = list(opcode.stack_before)
                popped_mark = opcode.name == "POP" and bool(stack) and stack[-1] is _MARK
                if pickletools.markobject in before or popped_mark:
                    if _MARK not in stack:
                        return None  # the unpickler fails here, before any call
                    top = len(stack) - 1 - stack[::-1].index(_MARK)
                    del stack[top:]
                    before = ([] if popped_mark
                              else before[:before.index(pickletools.markobject)])
                if len(stack) < len(before):
                    return None  # stack underflow: the unpickler fails here
                del stack[len(stack) - len(before):]
                if opcode.name in _CALLS:
                    return f"it is a pickle stream that calls a function ({opcode.name})"
                imported = imported or opcode.name in _IMPORTS
                stack.extend(_MARK if item is pickletools.markobject else _ITEM
                             for item in opcode.stack_after)
                if opcode.name == "STOP" and imported:
                    return "it is a pickle stream that imports a global (GLOBAL opcode)"
        except Exception:  # noqa: BLE001 - any decoding failure ends the stream: not a pickle
            return None
        if stream.tell() == start:
            return None
        # genops returned at a STOP without a call or import: another stream may follow.


def _suffix_reason(name: str, refused: frozenset[str]) -> str | None:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in refused:
        return f"its type ({suffix}) is code or a pickle container"
    return None


# -- zip archives ------------------------------------------------------------------------------


def _zip_reason(data: bytes | mmap.mmap, stream: BinaryIO) -> str | None:
    """Why a file holds a zip entry that is code or a pickle, or None.

    Args:
        data: The file's bytes (a memory map for a file on disk).
        stream: The same bytes as a seekable file, for ``zipfile``.
    """
    # Every local file header, wherever it is, listed in the directory or not.
    start, seen = 0, 0
    while (at := data.find(_LOCAL_HEADER, start)) != -1 and seen < MAX_ZIP_ENTRIES:
        start, seen = at + 4, seen + 1
        if at + 30 > len(data):
            break
        (method,) = struct.unpack_from("<H", data, at + 8)
        name_len, extra_len = struct.unpack_from("<HH", data, at + 26)
        name = bytes(data[at + 30:at + 30 + name_len]).decode("utf-8", "replace")
        reason = _entry_reason(name)
        if reason:
            return reason
        body = at + 30 + name_len + extra_len
        if method == 0 and _is_pickle_head(bytes(data[body:body + 2])):
            return f"it is a zip archive whose entry {name!r} is a pickle"
    # The central directory, as zipfile, torch and every other zip reader see it.
    if data.find(_END_OF_DIRECTORY, max(0, len(data) - (1 << 16) - 22)) == -1:
        return None
    try:
        stream.seek(0)
        with zipfile.ZipFile(stream) as archive:
            infos = archive.infolist()
            if len(infos) > MAX_ZIP_ENTRIES:
                return f"it is a zip archive of over {MAX_ZIP_ENTRIES} entries"
            for info in infos:
                reason = _entry_reason(info.filename)
                if reason:
                    return reason
                with archive.open(info) as entry:
                    if _is_pickle_head(entry.read(2)):
                        return f"it is a zip archive whose entry {info.filename!r} is a pickle"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError,
            OSError, EOFError, ValueError, struct.error):
        return None  # no zip reader can open this directory either
    return None


def _entry_reason(name: str) -> str | None:
    reason = _suffix_reason(name, REFUSED_SUFFIXES)
    if reason:
        return f"it is a zip archive holding {name!r} ({reason.removeprefix('its ')})"
    return None


def _is_pickle_head(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5


# -- the checks --------------------------------------------------------------------------------


def _refuse(rel: str, reason: str) -> UnsafeContentError:
    return UnsafeContentError(f"module file {rel!r} is refused: {reason}. Modules hold only "
                              "JSON, safetensors and plain data, so that loading one never "
                              "runs code")


def _content_reason(data: bytes | mmap.mmap, archive: BinaryIO) -> str | None:
    """Why a file's bytes are a pickle or a zip holding one, or None.

    Args:
        data: The bytes (a memory map for a file on disk: its read(n) never allocates more
            than the file holds, whatever length a hostile opcode declares).
        archive: The same bytes as a seekable file, for ``zipfile``.
    """
    if _is_pickle_head(bytes(data[:2])):
        return "it is a pickle stream (protocol header 0x80)"
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    stream.seek(0)
    return _pickle_reason(stream) or _zip_reason(data, archive)  # type: ignore[arg-type]


def refuse_code_or_pickle(rel: str, data: bytes) -> None:
    """Raise ``UnsafeContentError`` if a module file, held in memory, is code or a pickle.

    Args:
        rel: The file's path inside the module.
        data: Its bytes (all of them: a pickle or zip entry may lie past any prefix).
    """
    reason = _suffix_reason(rel, _MODULE_REFUSED)
    if reason is None and PurePosixPath(rel).suffix.lower() == ".safetensors":
        from graft.format.tensorfile import parse_safetensors_header

        parse_safetensors_header(data, len(data), what=rel)
        return
    if reason is None:
        reason = _content_reason(data, io.BytesIO(data))
    if reason:
        raise _refuse(rel, reason)


def check_file(path: str | os.PathLike[str], rel: str) -> None:
    """Refuse a module file that is not a regular file, or is code or a pickle.

    A ``.safetensors`` file must be a well-formed safetensors file (``tensorfile``); any
    other file is scanned whole for pickle streams and zip entries.

    Args:
        path: Where the file is.
        rel: Its path inside the module, for messages.

    Raises:
        FileNotFoundError: the file does not exist.
        UnsafeContentError: it is a link, FIFO, device or directory, or code or a pickle.
        FormatError: a ``.safetensors`` file is malformed.
    """
    reason = _suffix_reason(rel, _MODULE_REFUSED)
    if reason:
        raise _refuse(rel, reason)
    if PurePosixPath(rel).suffix.lower() == ".safetensors":
        from graft.format.tensorfile import read_safetensors_header

        read_safetensors_header(path, what=rel)
        return
    with open_regular(path, what=f"module file {rel!r}") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            reason = _content_reason(data, f)
    if reason:
        raise _refuse(rel, reason)
