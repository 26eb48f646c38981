"""Graft's own corner of the store for registry transfers: ``$GRAFT_HOME/oci-cache/``.

::

    partial/<hex>.part         a download in progress (resumed with a Range request), locked
                               (flock) by the process writing it
    blobs/<hex>                a downloaded blob, verified (digest and size), not yet in a module
    transfers.lock             held (shared) by every pull while it runs; gc cleans the
                               downloads only when it can hold it alone
    refs/manifest-<hex>.json   an OCI manifest digest -> the module digest it carries
    refs/tag-<hex>.json        sha256 of 'registry/repository:tag' -> last manifest seen there
    locations/<hex>.json       a module digest -> where it was pushed or pulled from

Blobs stay here only between a download and the store's ``add``; after that the store holds
the bytes (every tensor as its own blob, named by its sha256), and a pull finds the tensors it
already has there (see :func:`local_tensors`), so only a child's new tensors are fetched and a
pulled module costs its bytes once.
The records let a pinned reference resolve without the network, and let a push of a child
mount its parent's blobs from the repository the parent came from.

What an interrupted pull leaves (partial files, downloaded blobs) is what the next pull
resumes from; ``graft gc`` deletes it once no pull is running and it is of no further use
(:meth:`BlobCache.collect`): downloads the store already holds, and the rest once untouched
for :data:`RESUME_WINDOW` (or at once with ``graft gc --downloads``). Records are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from filelock import FileLock

from graft._fs import atomic_write, sha256_bytes
from graft.errors import FormatError
from graft.format import jsonio
from graft.format.manifest import Manifest

__all__ = ["BlobCache", "RESUME_WINDOW", "local_tensors"]

_MAX_RECORD = 1 << 20
#: Seconds a partial download, or a downloaded blob that no module holds yet, is kept for a
#: pull to resume from since it was last written; ``graft gc`` deletes it after that.
RESUME_WINDOW = 7 * 24 * 3600
_TRANSFERS = "transfers.lock"


class BlobCache:
    """The ``oci-cache`` folder under a store root."""

    def __init__(self, store_root: Path) -> None:
        self.root = Path(store_root) / "oci-cache"
        self._made: set[str] = set()

    def _dir(self, name: str) -> Path:
        path = self.root / name
        if name not in self._made:  # once per cache, not once per blob
            path.mkdir(parents=True, exist_ok=True)
            self._made.add(name)
        return path

    def blob(self, hexdigest: str) -> Path:
        """Where a verified downloaded blob lives."""
        return self._dir("blobs") / hexdigest

    def partial(self, hexdigest: str) -> Path:
        """Where a download in progress lives."""
        return self._dir("partial") / f"{hexdigest}.part"

    @contextlib.contextmanager
    def partial_download(self, hexdigest: str) -> Iterator[BinaryIO]:
        """The partial download of one blob, opened (created empty if there is none) and
        locked: two pulls never write one partial file.

        The lock is on the file itself, not on a lock file beside it: a file created per blob
        is what a pull's file system work costs most (``bench/registry.py`` line 4). A pull
        that waited finds the file renamed into ``blobs/`` or deleted, and takes a new one.
        """
        from graft.hub import staging

        with os.fdopen(staging.hold(self.partial(hexdigest)), "r+b") as part:
            yield part

    @contextlib.contextmanager
    def transfer(self) -> Iterator[None]:
        """Hold the cache for one pull: while any pull holds it, gc leaves the downloads."""
        from graft.hub import staging

        self.root.mkdir(parents=True, exist_ok=True)
        fd = staging.hold(self.root / _TRANSFERS, shared=True)
        try:
            yield
        finally:
            os.close(fd)

    def collect(self, in_store: Callable[[str], bool], *, everything: bool = False,
                now: float | None = None) -> tuple[int, int, bool]:
        """Delete the downloads no pull needs, unless a pull is running.

        Deleted: downloaded blobs and partial downloads of blobs the store holds (a later
        pull reads those from the store), partial downloads of blobs already downloaded,
        the per-blob lock files of earlier versions, and every other download untouched for
        :data:`RESUME_WINDOW` seconds; with ``everything``, every download.

        Args:
            in_store: Whether the store holds the blob with this hex sha256.

        Returns:
            ``(files removed, bytes freed, busy)``; ``busy`` when a pull was running and
            nothing was touched.
        """
        from graft.hub import staging

        if not self.root.is_dir():
            return 0, 0, False
        fd = staging.unheld(self.root / _TRANSFERS)
        if fd is None:
            return 0, 0, True
        now = time.time() if now is None else now
        removed = freed = 0

        def stale(path: Path) -> bool:
            try:
                return everything or now - path.lstat().st_mtime > RESUME_WINDOW
            except FileNotFoundError:
                return False

        def drop(path: Path) -> None:
            nonlocal removed, freed
            freed += staging.remove(path)
            removed += 1

        try:
            done = set()
            for blob in staging.entries(self.root / "blobs"):
                if in_store(blob.name) or stale(blob):
                    drop(blob)
                else:
                    done.add(blob.name)
            for part in staging.entries(self.root / "partial"):
                if part.suffix == ".lock":  # an earlier version's; no pull runs to hold it
                    part.unlink(missing_ok=True)
                    continue
                hexdigest = part.name.removesuffix(".part")
                if hexdigest in done or in_store(hexdigest) or stale(part):
                    drop(part)
        finally:
            if fd >= 0:
                os.close(fd)
        return removed, freed, False

    def discard(self, hexdigests: Iterable[str]) -> None:
        """Drop downloaded blobs once a module holds them."""
        for h in hexdigests:
            with contextlib.suppress(FileNotFoundError):
                (self.root / "blobs" / h).unlink()

    # -- records ---------------------------------------------------------------------------

    def module_of(self, manifest_digest: str) -> str | None:
        """The module digest a known OCI manifest carries."""
        record = self._load(self.root / "refs" / f"manifest-{_hex(manifest_digest)}.json")
        value = record.get("module") if isinstance(record, dict) else None
        return value if isinstance(value, str) else None

    def tag(self, registry: str, repository: str, tag: str) -> dict[str, Any] | None:
        """The last manifest seen under a tag: ``{"manifest", "module"}``."""
        record = self._load(self._tag_path(registry, repository, tag))
        return record if isinstance(record, dict) else None

    def locations(self, module_digest: str) -> list[dict[str, Any]]:
        """Where a module is known to live: ``{"registry", "repository", "manifest",
        "size"}`` each."""
        record = self._load(self.root / "locations" / f"{_hex(module_digest)}.json")
        return [r for r in record if isinstance(r, dict)] if isinstance(record, list) else []

    def remember(self, *, registry: str, repository: str, tag: str | None,
                 manifest_digest: str, manifest_size: int, module_digest: str) -> None:
        """Record that ``module_digest`` lives at ``registry/repository`` as that manifest."""
        with FileLock(str(self._dir("refs") / ".lock"), timeout=600):
            atomic_write(self.root / "refs" / f"manifest-{_hex(manifest_digest)}.json",
                         json.dumps({"module": module_digest}))
            if tag is not None:
                atomic_write(self._tag_path(registry, repository, tag),
                             json.dumps({"manifest": manifest_digest, "module": module_digest}))
            path = self._dir("locations") / f"{_hex(module_digest)}.json"
            entries = self.locations(module_digest)
            entry = {"registry": registry, "repository": repository,
                     "manifest": manifest_digest, "size": manifest_size}
            entries = [e for e in entries if (e.get("registry"), e.get("repository"))
                       != (registry, repository)] + [entry]
            atomic_write(path, json.dumps(entries, sort_keys=True))

    def _tag_path(self, registry: str, repository: str, tag: str) -> Path:
        key = sha256_bytes(f"{registry}/{repository}:{tag}".encode())
        return self._dir("refs") / f"tag-{key}.json"

    @staticmethod
    def _load(path: Path) -> Any:
        try:
            return jsonio.loads(path.read_bytes(), what=str(path), max_bytes=_MAX_RECORD)
        except (FileNotFoundError, FormatError):
            return None  # no record, or a damaged one: the registry is asked instead


def local_tensors(store: Any, wanted: set[str], first: Iterable[str] = ()
                  ) -> dict[str, tuple[Path, int, int]]:
    """Find tensors already in the store: hex sha256 -> (safetensors file, start, end).

    Args:
        store: The ``Store``.
        wanted: The tensor digests (hex) being looked for.
        first: Store handles (``name@sha256:...``) of a child's parents: every safetensors
            file of theirs is searched (hashing its tensors: a reference input a child shares
            is found too). Other stored modules are searched by their manifests' tensor
            digests, which costs no hashing.

    The byte ranges come from each stored file's own header; the caller still hashes the
    bytes it copies, so a damaged store costs a download, not a wrong module.
    """
    from graft.hub.oci.artifact import WEIGHTS, split_safetensors

    found: dict[str, tuple[Path, int, int]] = {}
    if not wanted:
        return found
    # The store's own tensor blobs first: a blob is named by the tensor's sha256.
    blob_path = getattr(store, "blob_path", None)
    if blob_path is not None:
        for hexdigest in wanted:
            with contextlib.suppress(OSError):
                size = blob_path(hexdigest).stat().st_size
                found[hexdigest] = (blob_path(hexdigest), 0, size)
        if wanted <= set(found):
            return found
    parents: list[Path] = []
    for handle in first:
        with contextlib.suppress(Exception):  # a parent not stored here is simply not a source
            parents.append(Path(store.resolve(handle).path))
    for directory in parents:
        with contextlib.suppress(OSError, FormatError, ValueError):
            manifest = Manifest.read(directory)
            for rel in manifest.files:
                if rel.endswith(".safetensors") and not wanted <= set(found):
                    with contextlib.suppress(OSError, FormatError, ValueError):
                        _, layout = split_safetensors(directory / rel)
                        for _, start, end, hexdigest in layout:
                            if hexdigest in wanted:
                                found.setdefault(hexdigest, (directory / rel, start, end))
    others: list[Path] = []
    with contextlib.suppress(Exception):
        others = [Path(m.path) for m in store.list()]
    for directory in others:
        if wanted <= set(found) or directory in parents:
            continue
        try:
            manifest = Manifest.read(directory)
            have = {e.sha256 for e in manifest.tensors.values()} & (wanted - set(found))
            if not have:
                continue
            header = _read_header(directory / WEIGHTS)
        except (OSError, FormatError, ValueError):
            continue
        from graft.hub.oci.artifact import parse_header

        with contextlib.suppress(FormatError):
            for name, start, end in parse_header(header):
                entry = manifest.tensors.get(name)
                if entry is not None and entry.sha256 in have:
                    found.setdefault(entry.sha256, (directory / WEIGHTS, start, end))
    return found


def _read_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        prefix = f.read(8)
        size = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 <= size <= (64 << 20):
            raise FormatError(f"{path} is not a safetensors file")
        return prefix + f.read(size)


def _hex(digest: str) -> str:
    hexdigest = digest.removeprefix("sha256:")
    if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
        raise FormatError(f"digest {digest!r} is malformed; expected 'sha256:<64 hex>'")
    return hexdigest
