"""``graft pull``: fetch a module from an OCI registry into the local store.

The walk: local first (a reference pinned by digest that is already stored returns without
the network; under ``GRAFT_OFFLINE=1`` nothing else is tried), then the manifest, validated
as a Graft artifact; the config blob, which must be a valid, canonical ``graft.json`` whose
digest is what the manifest says; the layers checked against that ``graft.json``; then only
the blobs the store lacks (a tensor is found by its digest among the store's tensor blobs,
then in the weights of older stored trees, a child's parents first), downloaded in parallel
and each verified before use; the module directory is
assembled in a staging folder of the store and added with ``Store.add``, which re-checks every
byte, so a module becomes visible only when all of it is there.
"""

from __future__ import annotations

import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from graft.errors import FormatError, IntegrityError, ModuleNotFound
from graft.format import jsonio
from graft.format.manifest import MANIFEST_NAME, Manifest
from graft.hub.oci.artifact import (
    CONFIG_TYPE,
    INDEX_TYPE,
    MANIFEST_TYPE,
    MAX_HEADER,
    MAX_MANIFEST,
    Descriptor,
    Plan,
    parse_header,
    parse_manifest,
)
from graft.hub.oci.cache import BlobCache, local_tensors
from graft.hub.oci.client import RegistryClient, check_offline
from graft.hub.oci.reference import Reference, parse_reference
from graft.hub.oci.transfer import download

__all__ = ["fetch_manifest", "pull"]

_COPY = 1 << 20


def pull(reference: str | Reference, *, store: Any = None, progress: bool | None = None,
         workers: int = 8, client: RegistryClient | None = None) -> Any:
    """Pull a module into the local store and return its ``StoredModule``.

    Args:
        reference: ``oci://HOST[:PORT]/NS/NAME[:TAG|@sha256:HEX]``; without a tag or digest,
            the tag ``latest``.
        store: The ``Store`` (default: ``$GRAFT_HOME``).
        progress: Show a byte progress bar; default: when stderr is a terminal.
        workers: Parallel blob downloads.
        client: A ``RegistryClient`` of the reference's registry (default: a new one).

    Raises:
        ModuleNotFound: the registry has no such module, or ``GRAFT_OFFLINE=1`` and it is not
            stored.
        IntegrityError / FormatError: what the registry sent is not the module it claims to be.
        RegistryError / RegistryAuthError: the registry cannot be reached or refuses.
    """
    from graft.hub.store import Store

    ref = parse_reference(str(reference)) if not isinstance(reference, Reference) else reference
    if ref.target is None:
        ref = ref.with_tag("latest")
    store = store if store is not None else Store()
    cache = BlobCache(store.root)
    stored = _local(store, cache, ref)
    if stored is not None:
        return stored
    check_offline(str(ref))
    own = client is None
    client = client or RegistryClient(ref.registry)
    try:
        with cache.transfer():  # gc leaves the downloads alone while this runs
            return _pull(store, cache, client, ref, progress, workers)
    finally:
        if own:
            client.close()


def _pull(store: Any, cache: BlobCache, client: RegistryClient, ref: Reference,
          progress: bool | None, workers: int) -> Any:
    """Fetch, check and add the module ``ref`` names (the transfer is held)."""
    data, digest = fetch_manifest(client, ref)
    plan = parse_manifest(data, f"the manifest of {ref}")
    module_digest = plan.config.digest
    stored = _stored(store, module_digest)
    if stored is None:
        config = _small_blob(client, ref, plan.config, cache)
        manifest = _module_manifest(config, plan, ref)
        stored = _assemble(store, cache, client, ref, plan, manifest, config, progress,
                           workers)
    cache.remember(registry=ref.registry, repository=ref.repository, tag=ref.tag,
                   manifest_digest=digest, manifest_size=len(data),
                   module_digest=module_digest)
    return stored


def fetch_manifest(client: RegistryClient, ref: Reference) -> tuple[bytes, str]:
    """GET a manifest, bounded in size and checked against a pinned digest."""
    scope = f"repository:{ref.repository}:pull"
    with client.stream("GET", f"/v2/{ref.repository}/manifests/{ref.target}", scope=scope,
                       headers={"Accept": f"{MANIFEST_TYPE}, {INDEX_TYPE}"}) as response:
        body = bytearray()
        for chunk in response.iter_raw(65536):
            body += chunk
            if len(body) > MAX_MANIFEST:
                raise FormatError(f"the manifest of {ref} is over {MAX_MANIFEST} bytes; "
                                  "refused")
    data = bytes(body)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if ref.digest is not None and digest != ref.digest:
        raise IntegrityError(f"the registry answered {ref} with a manifest whose digest is "
                             f"{digest}; refused, nothing stored")
    return data, digest


def _local(store: Any, cache: BlobCache, ref: Reference) -> Any:
    """The stored module a reference names without asking the registry, if any: always for
    a pinned digest; for a tag only offline (the last module pulled under it)."""
    from graft.settings import offline

    module_digest = None
    if ref.digest is not None:
        # the manifest digest a push or pull recorded; or the module digest itself, which
        # names the same bytes forever
        module_digest = cache.module_of(ref.digest) or ref.digest
    elif offline() and ref.tag is not None:
        record = cache.tag(ref.registry, ref.repository, ref.tag)
        module_digest = record.get("module") if record else None
    if isinstance(module_digest, str):
        return _stored(store, module_digest)
    return None


def _stored(store: Any, module_digest: str) -> Any:
    for module in store.list():
        if module.digest == module_digest:
            try:
                return store.resolve(f"{module.name}@{module_digest}")
            except (ModuleNotFound, IntegrityError):
                return None  # damaged or just removed: pull it again
    return None


def _small_blob(client: RegistryClient, ref: Reference, blob: Descriptor,
                cache: BlobCache) -> bytes:
    path = download(client, ref.repository, blob, cache)
    data = path.read_bytes()
    cache.discard([blob.hex])
    return data


def _module_manifest(config: bytes, plan: Plan, ref: Reference) -> Manifest:
    """The config blob as a ``Manifest``, refused unless it is canonical ``graft.json``."""
    if plan.config.media_type != CONFIG_TYPE:
        raise FormatError(f"the config of {ref} is not a Graft module config")
    try:
        manifest = Manifest.from_json(jsonio.loads(config, what=f"the config of {ref}"))
    except FormatError as exc:
        raise FormatError(f"the config of {ref} is not a valid {MANIFEST_NAME}: {exc}") from None
    if manifest.digest != plan.config.digest:
        raise IntegrityError(f"the config of {ref} holds a module whose digest is "
                             f"{manifest.digest}, not {plan.config.digest} as the artifact "
                             f"says (the {MANIFEST_NAME} is not canonical); refused")
    if MANIFEST_NAME in manifest.files:
        raise FormatError(f"the {MANIFEST_NAME} of {ref} lists itself among its files")
    plan.check(manifest)
    return manifest


def _assemble(store: Any, cache: BlobCache, client: RegistryClient, ref: Reference, plan: Plan,
              manifest: Manifest, config: bytes, progress: bool | None, workers: int) -> Any:
    # Whole files the store already holds (an unchanged reference file, labels, ...).
    blob_path = getattr(store, "blob_path", None)
    whole = {rel: blob_path(manifest.files[rel].sha256) for rel in manifest.files
             if blob_path is not None
             and _has(blob_path(manifest.files[rel].sha256), manifest.files[rel].size)}
    splits = {rel: split for rel, split in plan.tensor_files.items() if rel not in whole}
    # tensors and headers (a child's usually equal its parent's) are blobs of the store too
    wanted = {d.hex for split in splits.values() for d in (split.header,
                                                           *(t for _, t in split.tensors))}
    parents = [f"{p.handle.partition('@')[0]}@{p.digest}" for p in manifest.parents]
    local = local_tensors(store, wanted, first=parents)
    fetch: dict[str, Descriptor] = {}
    for rel, d in plan.files.items():
        if rel not in whole:
            fetch.setdefault(d.digest, d)
    for split in splits.values():
        if split.header.hex not in local:
            fetch.setdefault(split.header.digest, split.header)
        for _, d in split.tensors:
            if d.hex not in local:
                fetch.setdefault(d.digest, d)
    paths = _download_all(client, ref, list(fetch.values()), cache, progress, workers)
    with store.staging() as stage:
        tree = stage / "module"
        tree.mkdir()
        for rel, entry in manifest.files.items():
            if rel in whole:
                _copy_file(whole[rel], Descriptor("", "sha256:" + entry.sha256, entry.size),
                           tree / rel)
            elif rel in plan.files:
                _copy_file(paths[plan.files[rel].digest], plan.files[rel], tree / rel)
        for rel, split in splits.items():
            header = _header(client, ref, split.header, paths, local, cache)
            by_name = dict(split.tensors)
            layout = parse_header(header, {name: d.size for name, d in split.tensors})
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            with open(tree / rel, "xb") as out:
                out.write(header)
                for name, _, _ in layout:
                    d = by_name[name]
                    if d.digest in paths:
                        _append(out, paths[d.digest], d)
                    elif not _append_checked(out, *local[d.hex], d):
                        # the stored copy was damaged: fetch it after all
                        got = _download_all(client, ref, [d], cache, progress, 1)
                        _append(out, got[d.digest], d)
                        paths[d.digest] = got[d.digest]
        (tree / MANIFEST_NAME).write_bytes(config)
        stored = store.add(tree)
    cache.discard(p.name for p in paths.values())
    if stored.digest != manifest.digest:
        raise IntegrityError(f"pulled {ref} but the store holds {stored.digest}")
    return stored


def _header(client: RegistryClient, ref: Reference, d: Descriptor, paths: dict[str, Path],
            local: dict[str, tuple[Path, int, int]], cache: BlobCache) -> bytes:
    """A safetensors header's bytes: downloaded, or from the store when it holds them intact
    (otherwise fetched after all)."""
    if d.digest not in paths:
        source, start, end = local[d.hex]
        data = b""
        if end - start == d.size <= MAX_HEADER:
            try:
                with open(source, "rb") as f:
                    f.seek(start)
                    data = f.read(d.size)
            except OSError:
                pass
        if len(data) == d.size and "sha256:" + hashlib.sha256(data).hexdigest() == d.digest:
            return data
        paths[d.digest] = download(client, ref.repository, d, cache)
    return paths[d.digest].read_bytes()


def _download_all(client: RegistryClient, ref: Reference, blobs: list[Descriptor],
                  cache: BlobCache, progress: bool | None, workers: int) -> dict[str, Path]:
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    total = sum(d.size for d in blobs)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not show,
               desc=f"pulling {ref.name}", leave=False)
    with bar, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # the largest first, so that one big blob does not start last
        ordered = sorted(blobs, key=lambda d: -d.size)
        futures = {d.digest: pool.submit(download, client, ref.repository, d, cache, bar.update)
                   for d in ordered}
        return {digest: future.result() for digest, future in futures.items()}


def _has(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _copy_file(source: Path, d: Descriptor, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "xb") as out:
        if not _append_checked(out, source, 0, d.size, d):
            raise IntegrityError(f"the local copy of {d.digest} at {source} is damaged; run "
                                 "`graft verify` on the stored modules and try again")


def _append(out: Any, source: Path, d: Descriptor) -> None:
    """Append a blob this pull downloaded and verified (its size is checked again; its
    bytes are hashed once more by ``Store.add``, with the file they are part of)."""
    with open(source, "rb") as f:
        copied = _copy_stream(f, out)
    if copied != d.size:
        raise IntegrityError(f"blob {d.digest} changed in the download cache; pull again")


def _copy_stream(source: Any, out: Any) -> int:
    copied = 0
    while chunk := source.read(_COPY):
        out.write(chunk)
        copied += len(chunk)
    return copied


def _append_checked(out: Any, source: Path, start: int, end: int, d: Descriptor) -> bool:
    """Append bytes ``[start, end)`` of ``source`` to ``out`` if they hash to ``d``; leave
    ``out`` as it was and return False otherwise."""
    mark = out.tell()
    digest = hashlib.sha256()
    try:
        with open(source, "rb") as f:
            f.seek(start)
            left = end - start
            while left:
                chunk = f.read(min(left, _COPY))
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
                left -= len(chunk)
    except OSError:
        left = -1
    if left or "sha256:" + digest.hexdigest() != d.digest:
        out.truncate(mark)
        out.seek(mark)
        return False
    return True

