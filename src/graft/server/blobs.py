"""The server's bytes: content-addressed blob files and upload sessions' partial files.

Layout under the server root::

    blobs/sha256/<2 hex>/<hex>   one file per blob, named by its sha256, read-only once there
    uploads/<id>                 the bytes an upload session has received so far

A blob file appears under ``blobs/`` only complete and verified (temp file, fsync, hash,
rename, fsync of the directory), and a blob is *visible* only once the database links it to a
repository, which happens after the rename, in one transaction. A crash therefore leaves at
worst an unlinked blob file or a partial upload file, neither of which any request can see.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path
from typing import AsyncIterator

from graft._fs import fsync_dir, sha256_file
from graft.errors import RequestRefused
from graft._testing import stop_point

__all__ = ["BlobFiles", "DEFAULT_MAX_UPLOAD", "too_large"]

#: Default cap on one blob's size (bytes); ``graft serve --max-upload-bytes`` changes it.
DEFAULT_MAX_UPLOAD = 8 << 30
_STALE_UPLOAD = 24 * 3600.0  # seconds after which an untouched upload file is abandoned


def too_large(limit: int) -> RequestRefused:
    """The 413 refusal of an upload over ``limit`` bytes."""
    return RequestRefused(413, "SIZE_INVALID", f"the upload is over this registry's limit of "
                          f"{limit} bytes per blob; ask the operator to raise "
                          "`graft serve --max-upload-bytes`")


class BlobFiles:
    """Blob and upload files under one root.

    Args:
        root: The server root.
        max_upload: The most bytes one blob may have.
    """

    def __init__(self, root: Path, max_upload: int = DEFAULT_MAX_UPLOAD) -> None:
        self.root = root
        self.max_upload = max_upload
        self._blobs = root / "blobs" / "sha256"
        self._uploads = root / "uploads"
        self._uploads.mkdir(parents=True, exist_ok=True)
        self._writing: set[str] = set()  # sessions a request is appending to (event loop only)
        self._blobs.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        """The file of a checked ``sha256:<hex>`` digest (whether or not it exists)."""
        hexa = digest.removeprefix("sha256:")
        return self._blobs / hexa[:2] / hexa

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def read(self, digest: str, limit: int) -> bytes:
        """The bytes of a small blob (manifests, configs), refusing one over ``limit``."""
        path = self.path(digest)
        size = path.stat().st_size
        if size > limit:
            raise RequestRefused(400, "MANIFEST_INVALID", f"blob {digest} is {size} bytes, over "
                                 f"the {limit}-byte limit for a config or manifest")
        return path.read_bytes()

    # -- upload sessions --------------------------------------------------------------------

    def upload_path(self, upload: str) -> Path:
        return self._uploads / upload

    def start(self, upload: str) -> None:
        """Create the (empty) file of a new upload session."""
        with open(self.upload_path(upload), "xb"):
            pass

    def offset(self, upload: str) -> int:
        """Bytes the session has received (its file's size)."""
        try:
            return self.upload_path(upload).stat().st_size
        except FileNotFoundError:
            raise RequestRefused(404, "BLOB_UPLOAD_UNKNOWN", f"upload {upload} is unknown or "
                                 "was finished; start a new one") from None

    async def append(self, upload: str, chunks: AsyncIterator[bytes],
                     declared: int | None = None) -> int:
        """Append a request body to the session's file; return the new size.

        Args:
            declared: The body length the request declared (Content-Length or Content-Range);
                a body of another length is refused (400) and its bytes are cut off again.

        Raises:
            RequestRefused: 413 past the size limit, 400 on a length mismatch.
        """
        path = self.upload_path(upload)
        start = self.offset(upload)
        if declared is not None and start + declared > self.max_upload:
            raise too_large(self.max_upload)
        if upload in self._writing:
            # Two bodies written into one session at once would interleave; the second waits
            # for the client to resume at the offset the first one leaves.
            raise RequestRefused(416, "BLOB_UPLOAD_INVALID", f"upload {upload} is receiving "
                                 "another chunk; send chunks one after another")
        self._writing.add(upload)
        received = 0
        try:
            with open(path, "r+b") as f:
                f.seek(start)
                async for chunk in chunks:
                    received += len(chunk)
                    if start + received > self.max_upload:
                        raise too_large(self.max_upload)
                    f.write(chunk)
                    f.flush()
                    stop_point("serve.upload-chunk")  # a crash with part of a chunk on disk
                if declared is not None and received != declared:
                    raise RequestRefused(400, "SIZE_INVALID", f"the request declared {declared} "
                                         f"bytes but sent {received}")
        except BaseException:
            # Give the session back the offset it had, so a retry of this chunk starts clean.
            with contextlib.suppress(OSError):
                os.truncate(path, start)
            raise
        finally:
            self._writing.discard(upload)
        return start + received

    def commit(self, upload: str, digest: str) -> int:
        """Move a finished session's bytes to the blob ``digest``; return its size.

        The bytes are fsynced and hashed first; on a mismatch the session is dropped and
        nothing enters ``blobs/``.

        Raises:
            RequestRefused: 400 ``DIGEST_INVALID`` when the bytes do not hash to ``digest``.
        """
        source = self.upload_path(upload)
        with open(source, "rb+") as f:
            os.fsync(f.fileno())
        actual = "sha256:" + sha256_file(source)
        if actual != digest:
            source.unlink(missing_ok=True)
            raise RequestRefused(400, "DIGEST_INVALID", f"the uploaded bytes hash to {actual}, "
                                 f"not to the digest {digest} the request named; nothing was "
                                 "stored")
        size = source.stat().st_size
        target = self.path(digest)
        if target.is_file():
            source.unlink()  # the same bytes are already here (another push, or a retry)
            return size
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(source, 0o444)
        os.replace(source, target)
        fsync_dir(target.parent)
        stop_point("serve.blob-file-written")  # a crash between the blob's file and its row
        return size

    def put_bytes(self, digest: str, data: bytes) -> None:
        """Store small bytes (a manifest) as the blob ``digest`` = their sha256."""
        assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if target.is_file():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._uploads / f"put-{digest[7:23]}-{os.getpid()}-{time.monotonic_ns()}"
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o444)
        os.replace(tmp, target)
        fsync_dir(target.parent)

    def drop(self, upload: str) -> None:
        self.upload_path(upload).unlink(missing_ok=True)

    def reap(self, live: set[str]) -> int:
        """Delete upload files that no session owns or that nobody touched for a day."""
        removed = 0
        now = time.time()
        for path in self._uploads.iterdir():
            stale = now - path.stat().st_mtime > _STALE_UPLOAD
            if path.name not in live or stale:
                path.unlink(missing_ok=True)
                removed += 1
        return removed
