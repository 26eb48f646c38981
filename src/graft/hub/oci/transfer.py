"""Blob transfers: verified, resumable downloads and the upload protocol (monolithic, chunked,
cross-repository mount).

A download streams into ``oci-cache/partial/<hex>.part``, counting bytes as they come: more
bytes than the descriptor declares aborts at once (an endless body never fills the disk), a
short body is resumed with ``Range: bytes=N-``, and only a file whose size and sha256 match
the descriptor is renamed into ``oci-cache/blobs/``. An interrupted process leaves the partial
file, and the next pull resumes it after re-hashing what is there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path
from typing import Any, BinaryIO, Callable

from graft._testing import stop_point
from graft.errors import GraftError, IntegrityError, RegistryError
from graft.hub.oci.artifact import Descriptor
from graft.hub.oci.cache import BlobCache
from graft.hub.oci.client import RegistryClient

__all__ = ["download", "upload"]

_READ = 1 << 20
_ATTEMPTS = 5
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def download(client: RegistryClient, repository: str, blob: Descriptor, cache: BlobCache,
             progress: Callable[[int], None] = lambda n: None) -> Path:
    """Fetch one blob into the cache, verified; return its path there.

    Raises:
        IntegrityError: the bytes are longer than declared, or do not match the digest.
        RegistryError: the registry keeps sending less than declared, or fails.
    """
    done = cache.blob(blob.hex)
    if _intact(done, blob):
        return done
    part = cache.partial(blob.hex)
    with cache.partial_download(blob.hex) as out:
        if _intact(done, blob):  # another pull finished it while this one waited
            part.unlink(missing_ok=True)
            return done
        digest, offset = _resume(out, blob)
        for _ in range(_ATTEMPTS):
            if offset == blob.size:
                break
            offset, digest = _fetch(client, repository, blob, out, part, offset, digest,
                                    progress)
        # fsynced here, in the download's own thread, because the store links the file in as
        # its blob (hub/assemble.py) rather than copying it
        out.flush()
        os.fsync(out.fileno())
        if offset != blob.size:
            raise RegistryError(f"the registry {client.registry} sent {offset} of the "
                                f"{blob.size} bytes of blob {blob.digest} in {_ATTEMPTS} "
                                "attempts (a truncated body); try again later, the pull "
                                "resumes where it stopped")
        if "sha256:" + digest.hexdigest() != blob.digest:
            part.unlink(missing_ok=True)
            raise IntegrityError(f"blob {blob.digest} from {client.registry}/{repository} does "
                                 "not match its digest: the registry served other bytes. "
                                 "Nothing was stored; report it to the registry's operator")
        os.replace(part, done)  # while locked: a pull that waited finds it done
    return done


def _fetch(client: RegistryClient, repository: str, blob: Descriptor, out: Any, part: Path,
           offset: int, digest: Any, progress: Callable[[int], None]) -> tuple[int, Any]:
    """One GET of the rest of a blob, appended to ``out``; returns the new offset and hash."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    httpx = client._httpx
    try:
        with client.stream("GET", f"/v2/{repository}/blobs/{blob.digest}",
                           scope=f"repository:{repository}:pull", ok=(200, 206),
                           headers=headers) as response:
            if response.status_code == 206:
                match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
                if match is None or int(match.group(1)) != offset:
                    raise RegistryError(f"the registry {client.registry} answered a Range "
                                        f"request for {blob.digest} with another range")
            elif offset:  # a full body instead of the rest: start over
                out.truncate(0)
                out.seek(0)
                offset, digest = 0, hashlib.sha256()
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and offset + int(declared) > blob.size:
                raise _too_long(client, blob, part)
            half = blob.size // 2
            # as the bytes arrive (a chunk size would buffer, and lose them on a hang-up)
            for chunk in response.iter_raw():
                if offset + len(chunk) > blob.size:
                    raise _too_long(client, blob, part)
                out.write(chunk)
                digest.update(chunk)
                before, offset = offset, offset + len(chunk)
                client.count(received=len(chunk))
                progress(len(chunk))
                if before < half <= offset < blob.size:  # mid-blob, with bytes still to come
                    out.flush()  # what a kill here leaves behind is what a resume finds
                    stop_point("oci.pull.blob-half")
    except (httpx.TransportError, OSError) as exc:
        if isinstance(exc, GraftError):  # a refusal, not a dropped connection
            raise
        out.flush()  # what arrived stays; the next attempt asks for the rest
    return offset, digest


def _too_long(client: RegistryClient, blob: Descriptor, part: Path) -> IntegrityError:
    with contextlib.suppress(OSError):
        part.unlink()
    return IntegrityError(f"blob {blob.digest} from {client.registry} is longer than the "
                          f"{blob.size} bytes its descriptor declares; refused, nothing stored")


def _resume(part: BinaryIO, blob: Descriptor) -> tuple[Any, int]:
    """Hash what an interrupted download left in ``part``, to continue it (positioned at its
    end)."""
    digest = hashlib.sha256()
    if os.fstat(part.fileno()).st_size > blob.size:  # not this blob's: start over, unread
        part.truncate(0)
        return digest, 0
    size = 0
    while chunk := part.read(_READ):
        digest.update(chunk)
        size += len(chunk)
    return digest, size


def _intact(path: Path, blob: Descriptor) -> bool:
    try:
        if path.stat().st_size != blob.size:
            return False
    except FileNotFoundError:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest() == blob.digest


def upload(client: RegistryClient, repository: str, blob: Descriptor,
           read: Callable[[int, int], bytes], *, mount_from: str | None = None,
           chunk_size: int = 8 << 20, progress: Callable[[int], None] = lambda n: None) -> str:
    """Make sure the registry holds ``blob`` in ``repository``.

    Args:
        read: ``read(offset, length)`` returns the blob's bytes there.
        mount_from: Another repository of the same registry that may hold it.
        chunk_size: Blobs up to this size go in one PUT; larger ones in PATCH chunks of it.

    Returns:
        ``"present"``, ``"mounted"`` or ``"uploaded"``.
    """
    scope = f"repository:{repository}:pull,push"
    path = f"/v2/{repository}/blobs/{blob.digest}"
    if client.request("HEAD", path, scope=scope, allow=(404,)).status_code == 200:
        return "present"
    uploads = f"/v2/{repository}/blobs/uploads/"
    if mount_from and mount_from != repository:
        response = client.request("POST", uploads, ok=(201, 202),
                                  scope=f"{scope} repository:{mount_from}:pull",
                                  params={"mount": blob.digest, "from": mount_from})
        if response.status_code == 201:
            return "mounted"
    else:
        response = client.request("POST", uploads, scope=scope, ok=(202,))
    location = _location(client, response)
    if blob.size <= chunk_size:
        data = read(0, blob.size)
        client.request("PUT", location, scope=scope, ok=(201,), content=data,
                       params={"digest": blob.digest},
                       headers={"Content-Type": "application/octet-stream"})
        progress(len(data))
        return "uploaded"
    offset = 0
    while offset < blob.size:
        data = read(offset, min(chunk_size, blob.size - offset))
        response = client.request(
            "PATCH", location, scope=scope, ok=(202,), content=data,
            headers={"Content-Type": "application/octet-stream",
                     "Content-Range": f"{offset}-{offset + len(data) - 1}",
                     "Content-Length": str(len(data))})
        location = _location(client, response)
        offset += len(data)
        progress(len(data))
    client.request("PUT", location, scope=scope, ok=(201,), content=b"",
                   params={"digest": blob.digest})
    return "uploaded"


def _location(client: RegistryClient, response: Any) -> str:
    location = response.headers.get("location")
    if not location:
        raise RegistryError(f"the registry {client.registry} started an upload but gave no "
                            "Location to send it to")
    from urllib.parse import urljoin

    return urljoin(str(response.request.url), location)
