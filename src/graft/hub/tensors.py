"""Tensor-level blobs: a module's ``weights.safetensors`` stored as its header and one blob
per tensor, so that a fine-tuned child shares every unchanged tensor with its parent.

A tensor blob holds the tensor's raw little-endian C-order bytes and is named by the
``sha256`` the manifest records for the tensor (``tensors.<name>.sha256``); the header blob
holds the file's first ``8 + N`` bytes (length and JSON header). The file is those bytes
followed by the tensors back to back in offset order (the safetensors format allows no gaps,
``graft.format.tensorfile`` refuses any), so it is rebuilt byte for byte from the blobs.

The store's tree of such a module holds every other file and, instead of the weights, a
hard link :data:`HEADER_LINK` to the header blob (a name no module file can have: module
paths never start with a dot). Everything that reads here trusts nothing it has not
checked: the header is parsed with the bounds-checked reader and must describe exactly the
manifest's tensors, dtypes and shapes, and every blob's size is checked on the descriptor
that is read.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from graft._testing import stop_point
from graft.errors import IntegrityError
from graft.format import files
from graft.format.manifest import Manifest
from graft.format.tensorfile import (
    SAFETENSORS_DTYPES,
    SafetensorsHeader,
    parse_safetensors_header,
)
from graft.hub.blobs import open_regular, publish

__all__ = ["HEADER_LINK", "WEIGHTS", "Layout", "blob_key", "check_blobs", "check_header",
           "copy_hashed", "hash_blob", "hash_buffer", "is_split", "manifest_tensors", "place_bytes",
           "place_weights", "read_checked", "read_exact", "read_fd", "read_layout",
           "read_tensor", "valid_blob", "write_weights"]

WEIGHTS = "weights.safetensors"
#: The tree's link to the header blob of its weights (module paths never start with ".").
HEADER_LINK = ".weights-header"
_CHUNK = 4 << 20
_MAX_HEADER = 100 << 20  # far above format.limits' header bound: a bigger file is altered
_READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@dataclass(frozen=True)
class Layout:
    """The weights of a stored module as blobs.

    Args:
        header: The header blob's bytes (``8 + N``).
        header_sha256: Its hex sha256 (the blob's name).
        tensors: ``(name, sha256 hex, size)`` of every tensor in the file's data order.
    """

    header: bytes
    header_sha256: str
    tensors: tuple[tuple[str, str, int], ...]


def blob_key(sha256: str) -> str:
    """The key of a tensor blob in fingerprint maps (``sha256:<hex>``: never a module path,
    which has no colon)."""
    return "sha256:" + sha256


def is_split(tree: Path) -> bool:
    """Whether a stored tree keeps its weights as tensor blobs (else: a whole file, as trees
    written before tensor-level storage did)."""
    return os.path.lexists(tree / HEADER_LINK) or not os.path.lexists(tree / WEIGHTS)


def _checked_header(header: bytes, manifest: Manifest, what: str) -> SafetensorsHeader:
    """Parse header bytes and refuse any that do not describe exactly the manifest's
    tensors (names, dtypes, shapes) in a file of the manifest's size."""
    parsed = parse_safetensors_header(header, manifest.files[WEIGHTS].size, what=what)
    if parsed.data_start != len(header):
        raise IntegrityError(f"{what} is {len(header)} bytes but declares a header of "
                             f"{parsed.data_start}")
    if set(parsed.tensors) != set(manifest.tensors):
        odd = sorted(set(parsed.tensors) ^ set(manifest.tensors))[:5]
        raise IntegrityError(f"{what} does not hold the tensors the manifest lists ({odd})")
    for name, info in parsed.tensors.items():
        entry = manifest.tensors[name]
        if (info.dtype, tuple(info.shape)) != (entry.dtype, tuple(entry.shape)):
            raise IntegrityError(f"tensor {name} is {info.dtype}{list(info.shape)} in {what} "
                                 f"but the manifest records {entry.dtype}{list(entry.shape)}")
    return parsed


def _layout(header: bytes, manifest: Manifest, what: str) -> Layout:
    parsed = _checked_header(header, manifest, what)
    order = sorted(parsed.tensors.items(), key=lambda item: (item[1].begin, item[1].end))
    return Layout(header, hashlib.sha256(header).hexdigest(),
                  tuple((name, manifest.tensors[name].sha256, info.end - info.begin)
                        for name, info in order))


_ITEMSIZE = {name: size for name, size in SAFETENSORS_DTYPES.values()}


def manifest_tensors(manifest: Manifest) -> list[tuple[str, str, int]]:
    """``(name, sha256 hex, size in bytes)`` of every tensor, from the validated manifest
    alone (what the loader needs; the header only says where each tensor sits in the file)."""
    out = []
    for name, entry in manifest.tensors.items():
        count = _ITEMSIZE[entry.dtype]
        for dim in entry.shape:
            count *= dim
        out.append((name, entry.sha256, count))
    return out


def check_header(tree: Path, header_sha256: str) -> None:
    """Check, cheaply, that a split tree's header link holds the header the index recorded
    (hashing a few kilobytes; parsing it is left to :func:`read_layout`).

    Raises:
        IntegrityError / UnsafeContentError: it is missing, not a regular file, or altered.
    """
    with _open_header(tree) as f:
        if hashlib.sha256(f.read(_MAX_HEADER + 1)).hexdigest() != header_sha256:
            raise IntegrityError(f"its {HEADER_LINK} (the header of its weights) does not "
                                 "match the header the store recorded: it was altered")


def _open_header(tree: Path) -> BinaryIO:
    try:
        # not a module path (it starts with a dot), so opened directly; still no links,
        # no FIFOs (format.files.open_regular)
        return files.open_regular(tree.resolve() / HEADER_LINK, what=HEADER_LINK)
    except FileNotFoundError:
        raise IntegrityError(f"its {HEADER_LINK} (the header of its weights) is missing") \
            from None


def read_layout(tree: Path, manifest: Manifest, *, header_sha256: str | None = None) -> Layout:
    """The layout of a split tree's weights, from its header link.

    Args:
        header_sha256: When given, the header's bytes must hash to it.

    Raises:
        IntegrityError / FormatError / UnsafeContentError: the link is missing, not a regular
            file, or its header is malformed or does not match the manifest.
    """
    with _open_header(tree) as f:
        size = os.fstat(f.fileno()).st_size
        if size > manifest.files[WEIGHTS].size:
            raise IntegrityError(f"{HEADER_LINK} is larger than the weights it describes")
        header = f.read(size)
    layout = _layout(header, manifest, f"the weights header of {tree.name[:12]}")
    if header_sha256 is not None and layout.header_sha256 != header_sha256:
        raise IntegrityError("the weights header does not match the one the store recorded")
    return layout


def place_weights(blob_path: Callable[[str], Path], source: Path, manifest: Manifest,
                  work: Path) -> tuple[Layout, list[Path]]:
    """Split the module file ``weights.safetensors`` under ``source`` into a header blob and
    tensor blobs, hashing every tensor against the manifest and the whole file against its
    ``sha256`` on the way (what is stored is exactly what was checked).

    Args:
        blob_path: The store's hex sha256 -> blob path.
        work: The writer's work folder (same file system) for partial blobs.

    Returns:
        The layout, and the blobs this call created (a failed add takes them back).

    Raises:
        IntegrityError: the file changed since it was checked, or does not match the
            manifest (a tensor's bytes, dtype or shape, the file's size or sha256).
    """
    entry = manifest.files[WEIGHTS]
    created: list[Path] = []
    whole = hashlib.sha256()
    with open_regular(source, WEIGHTS) as src:
        prefix = src.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 <= length <= entry.size - 8:
            raise IntegrityError(f"{WEIGHTS} changed while it was being added; add it again")
        header = prefix + src.read(length)
        layout = _layout(header, manifest, WEIGHTS)
        whole.update(header)
        if place_bytes(blob_path(layout.header_sha256), header, work):
            created.append(blob_path(layout.header_sha256))
        stop_point("add.blob-placed")
        for name, sha256, size in layout.tensors:
            if _place_stream(blob_path(sha256), src, size, sha256, whole, work):
                created.append(blob_path(sha256))
            stop_point("add.blob-placed")
        if src.read(1) or whole.hexdigest() != entry.sha256:
            raise IntegrityError(f"{WEIGHTS} changed while it was being added (it no longer "
                                 "matches its sha256 in the manifest); add it again")
    return layout, created


def valid_blob(blob: Path, size: int, sha256: str) -> bool:
    try:
        with open(blob, "rb") as f:
            if os.fstat(f.fileno()).st_size != size:
                return False
            digest = hashlib.sha256()
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
            return digest.hexdigest() == sha256
    except OSError:
        return False


def place_bytes(blob: Path, data: bytes, work: Path) -> bool:
    sha256 = hashlib.sha256(data).hexdigest()
    if valid_blob(blob, len(data), sha256):
        return False
    existed = os.path.lexists(blob)
    part = work / f"{sha256}.part"
    with open(part, "xb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(part, _READ_ONLY)
    blob.parent.mkdir(parents=True, exist_ok=True)
    publish(part, blob)
    return not existed


def _place_stream(blob: Path, src: BinaryIO, size: int, sha256: str, whole: Any,
                  work: Path) -> bool:
    """Copy the next ``size`` bytes of ``src`` to ``blob`` (unless a valid blob is there),
    checking that they hash to ``sha256``; ``whole`` is updated with them too."""
    keep = not valid_blob(blob, size, sha256)
    part = work / f"{sha256}.part"
    digest = hashlib.sha256()
    out = open(part, "xb") if keep else None
    try:
        if copy_hashed(src, out, size, digest, whole) != size or digest.hexdigest() != sha256:
            raise IntegrityError(f"a tensor of {WEIGHTS} does not match its sha256 in the "
                                 "manifest, or the file changed while it was being added")
        if out is None:
            return False
        out.flush()
        os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()
    existed = os.path.lexists(blob)
    os.chmod(part, _READ_ONLY)
    blob.parent.mkdir(parents=True, exist_ok=True)
    publish(part, blob)
    return not existed


def copy_hashed(src: BinaryIO, out: BinaryIO | None, size: int, *digests: Any) -> int:
    """Read up to ``size`` bytes of ``src`` in chunks into every hash of ``digests`` (and
    into ``out``, unless None). Returns how many bytes there were: fewer when ``src`` ends."""
    left = size
    while left > 0:
        chunk = src.read(min(left, _CHUNK))
        if not chunk:
            break
        for digest in digests:
            digest.update(chunk)
        if out is not None:
            out.write(chunk)
        left -= len(chunk)
    return size - left


def _open_blob(path: str, size: int, what: str) -> tuple[int, os.stat_result]:
    """Open the regular file ``path`` of exactly ``size`` bytes: its descriptor and ``fstat``.

    Plain descriptors, no file objects: this runs for every tensor of every load.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        raise IntegrityError(f"{what} is missing from the store") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise IntegrityError(f"{what} is {st.st_size} bytes but the manifest records "
                                 f"{size}: it is truncated or altered")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_fd(fd: int, size: int, into: Any, what: str) -> None:
    """Read exactly ``size`` bytes from ``fd`` into the buffer ``into``."""
    view = memoryview(into).cast("B")
    done = 0
    while done < size:
        n = os.readv(fd, [view[done:]])
        if not n:
            raise IntegrityError(f"{what} was truncated while it was read")
        done += n


def read_exact(path: str, size: int, into: Any, what: str) -> os.stat_result:
    """Read the regular file ``path`` of exactly ``size`` bytes into the buffer ``into``.

    Returns:
        The file's ``fstat``, taken on the descriptor that was read.
    """
    fd, st = _open_blob(path, size, what)
    try:
        read_fd(fd, size, into, what)
    finally:
        os.close(fd)
    return st


def read_tensor(blob: str, size: int, into: Any) -> None:
    """Read a tensor blob into a writable buffer of ``size`` bytes, refusing a blob of
    another size or type (its contents were checked by the store, see trees.check_tree)."""
    read_exact(blob, size, into, f"tensor blob {os.path.basename(blob)[:12]}")


def read_checked(blob_file: Callable[[str], str], manifest: Manifest,
                 recorded: dict[str, Any] | None, alloc: Callable[[str, int], Any],
                 now_ns: Callable[[], int], fingerprint: Any,
                 mapped: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Read every tensor of a split module into ``alloc(name, size)`` buffers, checking
    each blob on the descriptor read: its type and size, and its bytes (hashed from the
    buffer, never read twice) unless the recorded fingerprint vouches for it.

    With ``mapped``, a blob whose fingerprint vouches for it is not read here: it is handed
    over as ``mapped(name, fd, size)`` (the descriptor is closed after the call), so the
    caller can map it copy-on-write instead of copying its bytes (or read it, when small).

    Returns:
        Fresh fingerprints of the blobs hashed and found intact (keyed by :func:`blob_key`).

    Raises:
        IntegrityError: a blob is missing, of the wrong size, or altered.
    """
    recorded = recorded or {}
    fresh: dict[str, Any] = {}
    # This loop runs once per tensor of every load (hundreds): plain descriptors, and error
    # messages built only when one is raised.
    flags = os.O_RDONLY | _NOFOLLOW
    for name, sha256, size in manifest_tensors(manifest):
        if not size:
            alloc(name, size)
            continue
        key = "sha256:" + sha256  # blob_key
        checked = now_ns()  # before the fstat: a change after it always counts as racy
        try:
            fd = os.open(blob_file(sha256), flags)
        except FileNotFoundError:
            raise IntegrityError(f"the blob of tensor {name} is missing from the store") \
                from None
        try:
            st = os.fstat(fd)
            if st.st_size != size or not stat.S_ISREG(st.st_mode):
                raise IntegrityError(f"the blob of tensor {name} is {st.st_size} bytes but "
                                     f"the manifest records {size}: it is truncated or altered")
            vouched = recorded.get(key)
            trusted = key in fresh or (vouched is not None and vouched.vouches_for(st))
            if trusted and mapped is not None:
                mapped(name, fd, size)
                continue
            into = alloc(name, size)
            read_fd(fd, size, into, f"the blob of tensor {name}")
        finally:
            os.close(fd)
        if trusted:
            continue
        if hash_buffer(memoryview(into).cast("B")) != sha256:
            raise IntegrityError(f"the blob of tensor {name} does not match its sha256 in the "
                                 "manifest: it was altered")
        fresh[key] = fingerprint.of(st, checked)
    return fresh


def hash_buffer(view: Any) -> str:
    """The hex sha256 of bytes in memory."""
    return hashlib.sha256(view).hexdigest()


def write_weights(blob_path: Callable[[str], Path], layout: Layout, dest: Path,
                  expected_sha256: str, *, read_only: bool = True, what: str = WEIGHTS) -> None:
    """Write ``weights.safetensors`` (or the safetensors file ``what``) to ``dest`` (a new
    file) from the blobs, byte for byte the module's file, checked against the manifest's
    ``sha256`` before it is kept.

    Raises:
        IntegrityError: a blob is missing or damaged (``dest`` is removed).
    """
    whole = hashlib.sha256(layout.header)
    try:
        with open(dest, "xb") as out:
            out.write(layout.header)
            for name, sha256, size in layout.tensors:
                digest = hashlib.sha256()
                try:
                    with open(blob_path(sha256), "rb") as f:
                        if os.fstat(f.fileno()).st_size != size:
                            raise IntegrityError(f"the blob of tensor {name} has the wrong size")
                        while chunk := f.read(_CHUNK):
                            digest.update(chunk)
                            whole.update(chunk)
                            out.write(chunk)
                except FileNotFoundError:
                    raise IntegrityError(f"the blob of tensor {name} is missing") from None
                if digest.hexdigest() != sha256:
                    raise IntegrityError(f"the blob of tensor {name} does not match its sha256")
            out.flush()
            os.fsync(out.fileno())
        if whole.hexdigest() != expected_sha256:
            raise IntegrityError(f"the rebuilt {what} does not match its sha256 in the "
                                 "manifest")
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    if read_only:
        os.chmod(dest, _READ_ONLY)


def hash_blob(f: BinaryIO, whole: Any = None) -> str:
    """The hex sha256 of an open blob's bytes from where it is read; ``whole`` (a hasher),
    when given, is updated with them too."""
    digest = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        digest.update(chunk)
        if whole is not None:
            whole.update(chunk)
    return digest.hexdigest()


def check_blobs(blob_file: Callable[[str], str], entries: list[tuple[str, str, int]],
                recorded: dict[str, Any], level: str, now_ns: Callable[[], int],
                fingerprint: Any, whole: Any = None) -> dict[str, Any]:
    """Check tensor blobs (see trees.check_tree for the levels): sizes always; contents
    hashed at ``full``, and at ``read`` unless the blob's recorded fingerprint (keyed by
    :func:`blob_key`) vouches for it.

    Args:
        blob_file: hex sha256 -> the blob's path (a string: this runs on every load, for
            hundreds of tensors).
        entries: ``(name, sha256, size)``; in the file's data order when ``whole`` is given.
        whole: At ``full``, a hasher fed every tensor's bytes in order (the caller compares
            the rebuilt file's digest with the manifest's).

    Returns:
        Fresh fingerprints of the blobs hashed and found intact, keyed by :func:`blob_key`.

    Raises:
        IntegrityError: a blob is missing, of the wrong size or altered.
    """
    fresh: dict[str, Any] = {}
    seen: set[str] = set()
    for name, sha256, size in entries:
        if sha256 in seen and whole is None:
            continue
        seen.add(sha256)
        path = blob_file(sha256)
        checked = now_ns()  # before the stat: a change after it then always counts as racy
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise IntegrityError(f"the blob of tensor {name} ({sha256[:12]}) is missing from "
                                 "the store") from None
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise IntegrityError(f"the blob of tensor {name} is {st.st_size} bytes but the "
                                 f"manifest records {size}: it is truncated or altered")
        if level == "sizes":
            continue
        vouched = recorded.get(blob_key(sha256))
        if level == "read" and vouched is not None and vouched.vouches_for(st):
            continue
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())  # what is hashed is what is fingerprinted
            if st.st_size != size or hash_blob(f, whole) != sha256:
                raise IntegrityError(f"the blob of tensor {name} does not match its sha256 "
                                     "in the manifest: it was altered")
        fresh[blob_key(sha256)] = fingerprint.of(st, checked)
    return fresh
