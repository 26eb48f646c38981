"""``graft push``: publish a module as an OCI artifact.

Only what the registry lacks is sent: each blob is asked for with HEAD first; a blob that a
module's parent already has in another repository of the same registry is mounted from there
(no bytes move); the rest is uploaded, in one PUT when small and in PATCH chunks when large.
The manifest goes last, so a reader never sees a tag whose blobs are not all there.

A child names its parent in ``subject``. The subject must be a manifest of the same
repository, so when the parent lives in another repository of this registry its manifest is
copied here first (its blobs mounted, its manifest put by digest, no tag). Registries without
the referrers API (CNCF distribution 2.8) get the OCI 1.1 fallback: the image index under the
tag ``sha256-<parent hex>`` lists the children.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from graft._fs import sha256_bytes
from graft.errors import HandleError, ModuleNotFound, RegistryError
from graft.format.manifest import Manifest
from graft.hub.oci.artifact import ARTIFACT_TYPE, MANIFEST_TYPE, Descriptor, build_manifest
from graft.hub.oci.cache import BlobCache
from graft.hub.oci.client import RegistryClient, check_offline
from graft.hub.oci.reference import Reference, parse_reference, tag_for_version
from graft.hub.oci.referrers import add_referrer
from graft.hub.oci.transfer import upload

__all__ = ["PushResult", "push", "resolve_module"]


@dataclass(frozen=True)
class PushResult:
    """What a push did.

    Args:
        reference: Where the module now is, pinned by manifest digest.
        tag: The tag it was put under.
        manifest_digest: The OCI manifest's digest.
        module_digest: The Graft module digest (the config blob's).
        uploaded, mounted, present: Blobs sent, mounted from another repository, already there.
        bytes_sent: Request body bytes sent (blobs and manifests).
        subject: The parent manifest named as ``subject``, if any.
    """

    reference: str
    tag: str
    manifest_digest: str
    module_digest: str
    uploaded: int
    mounted: int
    present: int
    bytes_sent: int
    subject: str | None


def push(handle: Any, reference: str | Reference, *, store: Any = None,
         progress: bool | None = None, chunk_size: int = 8 << 20, workers: int = 8,
         client: RegistryClient | None = None) -> PushResult:
    """Push a module to an OCI registry.

    Args:
        handle: A store handle (``name@1.0.0``), a module directory, or a ``StoredModule``.
        reference: ``oci://HOST[:PORT]/NS/NAME[:TAG]``; the tag defaults to the module's
            version.
        store: The ``Store`` to resolve store handles in (and to record the push in).
        progress: Show a byte progress bar; default: when stderr is a terminal.
        chunk_size: Blobs larger than this are uploaded in chunks of it.
        workers: Parallel blob uploads.
        client: A ``RegistryClient`` of the reference's registry (default: a new one).

    Raises:
        HandleError: the reference pins a digest (push to a tag).
        RegistryError / RegistryAuthError: the registry cannot be reached or refuses.
    """
    from graft.hub.store import Store

    store = store if store is not None else Store()
    directory, module = resolve_module(handle, store)
    ref = parse_reference(str(reference)) if not isinstance(reference, Reference) else reference
    if ref.digest is not None:
        example = f"oci://{ref.registry}/{ref.repository}:{tag_for_version(module.version)}"
        raise HandleError(f"cannot push to {ref}: a digest names a manifest that already "
                          f"exists; push to a tag, e.g. {example}")
    tag = ref.tag or tag_for_version(module.version)
    check_offline(f"push to {ref}")
    cache = BlobCache(store.root)
    own = client is None
    client = client or RegistryClient(ref.registry)
    try:
        parent = _parent_here(cache, module, ref)
        mount_from = parent["repository"] if parent else None
        subject, copied = None, {"uploaded": 0, "mounted": 0}
        if parent is not None:
            subject, copied = _subject(client, ref, parent, progress, chunk_size, workers)
        # a store tree sends its tensors straight from the store's blobs (hub/tensors.py)
        in_store = Path(directory).parent == store.module_path(module.digest).parent
        data, plan, sources = build_manifest(module, directory, subject,
                                             store.blob_path if in_store else None)
        readers = _readers(module, plan, sources)
        counts = _send_blobs(client, ref.repository, plan.blobs().values(), plan.config,
                             readers, mount_from, progress, chunk_size, workers,
                             f"pushing {module.name}")
        response = client.request("PUT", f"/v2/{ref.repository}/manifests/{tag}",
                                  scope=f"repository:{ref.repository}:pull,push", ok=(201,),
                                  content=data, headers={"Content-Type": MANIFEST_TYPE})
        descriptor = Descriptor(MANIFEST_TYPE, "sha256:" + sha256_bytes(data), len(data),
                                _annotations(module), artifact_type=ARTIFACT_TYPE)
        if subject is not None and "oci-subject" not in response.headers:
            add_referrer(client, ref.repository, subject.digest, descriptor)
        cache.remember(registry=ref.registry, repository=ref.repository, tag=tag,
                       manifest_digest=descriptor.digest, manifest_size=len(data),
                       module_digest=module.digest)
        return PushResult(reference=str(ref.with_digest(descriptor.digest)), tag=tag,
                          manifest_digest=descriptor.digest, module_digest=module.digest,
                          uploaded=counts["uploaded"] + copied["uploaded"],
                          mounted=counts["mounted"] + copied["mounted"],
                          present=counts["present"], bytes_sent=client.bytes_sent,
                          subject=subject.digest if subject else None)
    finally:
        if own:
            client.close()


def resolve_module(handle: Any, store: Any) -> tuple[Path, Manifest]:
    """The directory and manifest of a store handle, a module directory or a StoredModule."""
    from graft.format.validate import check_module
    from graft.hub.handles import parse_handle

    if hasattr(handle, "path") and hasattr(handle, "digest") and hasattr(handle, "name"):
        handle = f"{handle.name}@{handle.digest}"
    parsed = parse_handle(handle)
    if parsed.kind == "store":
        stored, manifest = store.open(parsed)
        return Path(stored.path), manifest
    if parsed.kind == "path":
        directory = Path(parsed.path).expanduser()
        manifest = Manifest.read(directory)
        check_module(directory, manifest, hash_contents=True)
        return directory, manifest
    if parsed.kind == "oci":
        from graft.hub.oci.pull import pull

        stored = pull(str(handle), store=store)
        return Path(stored.path), stored.manifest()
    raise HandleError(f"{handle}: expected a store handle, a module directory or an oci:// "
                      "reference")


def _parent_here(cache: BlobCache, module: Manifest, ref: Reference) -> dict[str, Any] | None:
    """Where on this registry the module's first parent is known to live (this repository
    preferred), from the records of earlier pushes and pulls."""
    for parent in module.parents:
        places = [p for p in cache.locations(parent.digest) if p.get("registry") == ref.registry]
        places.sort(key=lambda p: p.get("repository") != ref.repository)
        if places:
            return places[0]
    return None


def _subject(client: RegistryClient, ref: Reference, parent: dict[str, Any],
             progress: bool | None, chunk_size: int, workers: int
             ) -> tuple[Descriptor | None, dict[str, int]]:
    """The parent's manifest descriptor in this repository, copying it here if it lives in
    another one (None when the registry no longer has it), and the blobs that copy moved."""
    from graft.hub.oci.artifact import parse_manifest
    from graft.hub.oci.pull import fetch_manifest

    where = Reference(ref.registry, parent["repository"], digest=parent["manifest"])
    try:
        data, digest = fetch_manifest(client, where)
    except ModuleNotFound:
        return None, {"uploaded": 0, "mounted": 0}
    descriptor = Descriptor(MANIFEST_TYPE, digest, len(data))
    counts = {"uploaded": 0, "mounted": 0}
    if where.repository != ref.repository:
        plan = parse_manifest(data, f"the manifest of {where}")
        def missing(offset: int, length: int) -> bytes:
            raise RegistryError(f"the registry {ref.registry} would not mount the blobs of "
                                f"the parent {where} into {ref.repository}; push the parent "
                                f"to {ref.repository} first, or push the child without it")

        counts = _send_blobs(client, ref.repository, plan.blobs().values(), plan.config, {},
                             where.repository, progress, chunk_size, workers,
                             "mounting parent", fallback=missing)
        client.request("PUT", f"/v2/{ref.repository}/manifests/{digest}",
                       scope=f"repository:{ref.repository}:pull,push", ok=(201,),
                       content=data, headers={"Content-Type": MANIFEST_TYPE})
    return descriptor, counts


def _readers(module: Manifest, plan: Any, sources: dict[str, tuple[Path, int, int]]
             ) -> dict[str, Callable[[int, int], bytes]]:
    """digest -> read(offset, length) for every blob of the artifact."""
    config = module.canonical()
    readers: dict[str, Callable[[int, int], bytes]] = {
        plan.config.digest: lambda o, n: config[o:o + n]}
    for digest, (path, start, _) in sources.items():
        readers.setdefault(digest, _file_reader(path, start))
    return readers


def _file_reader(path: Path, base: int) -> Callable[[int, int], bytes]:
    def read(offset: int, length: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(base + offset)
            return f.read(length)
    return read


def _send_blobs(client: RegistryClient, repository: str, blobs: Any, config: Descriptor,
                readers: dict[str, Callable[[int, int], bytes]], mount_from: str | None,
                progress: bool | None, chunk_size: int, workers: int, desc: str,
                fallback: Callable[[int, int], bytes] | None = None) -> dict[str, int]:
    from tqdm import tqdm

    todo = [config, *[b for b in blobs if b.digest != config.digest]]
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=sum(b.size for b in todo), unit="B", unit_scale=True, unit_divisor=1024,
               disable=not show, desc=desc, leave=False)
    counts = {"uploaded": 0, "mounted": 0, "present": 0}

    def one(blob: Descriptor) -> str:
        read = readers.get(blob.digest, fallback)
        assert read is not None  # every blob has a reader, or the caller gave a fallback
        outcome = upload(client, repository, blob, read, mount_from=mount_from,
                         chunk_size=chunk_size, progress=bar.update)
        if outcome != "uploaded":
            bar.update(blob.size)
        return outcome

    with bar, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for outcome in pool.map(one, todo):
            counts[outcome] += 1
    return counts


def _annotations(module: Manifest) -> dict[str, str]:
    return {"org.opencontainers.image.title": module.name,
            "org.opencontainers.image.version": module.version}

