"""``graft pull``: fetch a module from an OCI registry into the local store.

The walk: local first (a reference pinned by digest that is already stored returns without
the network; under ``GRAFT_OFFLINE=1`` nothing else is tried), then the manifest, validated
as a Graft artifact; the config blob, which must be a valid, canonical ``graft.json`` whose
digest is what the manifest says; the layers checked against that ``graft.json``; then only
the blobs the store lacks (a tensor is found by its digest among the store's tensor blobs,
then in the weights of older stored trees, a child's parents first), downloaded in parallel
and each verified before use; then ``Store.add_blobs`` links the downloads into the store
(they are its blobs: each byte is written once), checks every byte and program as
``Store.add`` does, and indexes the module last, so it becomes visible only when all of it
is there.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AbstractSet, Any, Callable

from graft.errors import FormatError, IntegrityError, ModuleNotFound
from graft.format import jsonio
from graft.format.manifest import MANIFEST_NAME, Manifest
from graft.format.validate import check_programs, program_files
from graft.hub.oci.artifact import (
    CONFIG_TYPE,
    INDEX_TYPE,
    MANIFEST_TYPE,
    MAX_HEADER,
    MAX_MANIFEST,
    WEIGHTS,
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
        stored = _assemble(store, cache, client, ref, plan, manifest, progress, workers)
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
              manifest: Manifest, progress: bool | None, workers: int) -> Any:
    """Download the blobs the store lacks and hand them to ``Store.add_blobs``, which links
    them into place (each byte is written once) and checks the whole module."""
    from graft.hub.tensorfiles import FileLayout, is_stored_split

    def have(sha: str, size: int) -> bool:
        return _has(store.blob_path(sha), size)

    # Files kept whole that the store already holds (an unchanged label file, ...); a
    # constants file is kept whole but sent split.
    whole = {rel for rel, entry in manifest.files.items()
             if (rel not in plan.tensor_files or not (rel == WEIGHTS or is_stored_split(rel)))
             and have(entry.sha256, entry.size)}
    splits = {rel: split for rel, split in plan.tensor_files.items() if rel not in whole}
    # tensors and headers (a child's usually equal its parent's) are blobs of the store too
    wanted = {d.hex for split in splits.values() for d in (split.header,
                                                           *(t for _, t in split.tensors))}
    parents = [f"{p.handle.partition('@')[0]}@{p.digest}" for p in manifest.parents]
    sources: dict[str, tuple[Path, int, int]] = dict(local_tensors(store, wanted,
                                                                   first=parents))
    fetch: dict[str, Descriptor] = {}
    for rel, d in plan.files.items():
        if rel not in whole:
            fetch.setdefault(d.hex, d)
    for split in splits.values():
        for d in (split.header, *(t for _, t in split.tensors)):
            if d.hex not in sources:
                fetch.setdefault(d.hex, d)
    # The programs are checked (the slowest check of a module, and pure Python) while the
    # tensors are still arriving, when all of them are downloads; the tree check then knows.
    programs = {rel: manifest.files[rel].sha256 if rel in manifest.files else None
                for rel in program_files(manifest)}
    checked: set[str] = set()

    def check_early(paths: dict[str, Path]) -> None:
        checked.update(check_programs(None, manifest, files={
            rel: paths[f"sha256:{sha}"] for rel, sha in programs.items()}))

    early = all(sha in fetch for sha in programs.values())

    def meanwhile(first: Callable[[], dict[str, Path]]) -> None:
        # while the blobs download: the store folders they go in (a fresh store has none of
        # them). Only a head start: gc may take an empty one away again, and placing a blob
        # makes its folder anew and reports what stops it.
        with contextlib.suppress(OSError):
            for folder in {store.blob_path(sha).parent for sha in fetch}:
                folder.mkdir(parents=True, exist_ok=True)
        if early:  # ... and the programs, as soon as they are here
            check_early(first())

    downloaded = _download_all(client, ref, list(fetch.values()), cache, progress, workers,
                               first={f"sha256:{sha}" for sha in programs.values()} if early
                               else set(),
                               meanwhile=meanwhile)
    sources.update((d.hex, (downloaded[d.digest], 0, d.size)) for d in fetch.values())
    blobs = {d.hex: d for d in plan.blobs().values()}

    def fetch_again(missing: list[tuple[str, int]]) -> dict[str, Path]:
        # a stored copy turned out damaged: download it after all
        got = _download_all(client, ref, [blobs[sha] for sha, _ in missing], cache, progress,
                            1)
        downloaded.update(got)
        return {d.hex: got[d.digest] for d in (blobs[sha] for sha, _ in missing)}

    layouts = {}
    for rel, split in splits.items():
        header = _header(client, ref, split.header, sources, cache, downloaded)
        by_name = dict(split.tensors)
        order = parse_header(header, {name: d.size for name, d in split.tensors})
        layouts[rel] = FileLayout((split.header.hex, split.header.size),
                                  tuple((name, by_name[name].hex, by_name[name].size)
                                        for name, _, _ in order))
    stored = store.add_blobs(manifest, layouts, sources, fetch_again,
                             fresh={d.hex for d in fetch.values()}, checked_programs=checked)
    cache.discard(p.name for p in downloaded.values())
    if stored.digest != manifest.digest:
        raise IntegrityError(f"pulled {ref} but the store holds {stored.digest}")
    return stored


def _header(client: RegistryClient, ref: Reference, d: Descriptor,
            sources: dict[str, tuple[Path, int, int]], cache: BlobCache,
            downloaded: dict[str, Path]) -> bytes:
    """A safetensors header's bytes, from its source when that holds them intact (otherwise
    downloaded after all, and added to ``sources`` and ``downloaded``)."""
    source, start, end = sources[d.hex]
    data = b""
    if end - start == d.size <= MAX_HEADER:
        try:
            with open(source, "rb") as f:
                f.seek(start)
                data = f.read(d.size)
        except OSError:
            pass
    if len(data) != d.size or "sha256:" + hashlib.sha256(data).hexdigest() != d.digest:
        path = downloaded[d.digest] = download(client, ref.repository, d, cache)
        sources[d.hex] = (path, 0, d.size)
        data = path.read_bytes()
    return data


def _download_all(client: RegistryClient, ref: Reference, blobs: list[Descriptor],
                  cache: BlobCache, progress: bool | None, workers: int,
                  first: AbstractSet[str] = frozenset(),
                  meanwhile: Callable[[Callable[[], dict[str, Path]]], None] | None = None
                  ) -> dict[str, Path]:
    """Download ``blobs`` in parallel: digest -> file. The digests in ``first`` start first.
    ``meanwhile`` runs in this thread while they download, given a function that waits for
    the files of ``first`` (a failure in it cancels what has not started)."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    total = sum(d.size for d in blobs)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not show,
               desc=f"pulling {ref.name}", leave=False)
    with bar, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # then the largest first, so that one big blob does not start last
        ordered = sorted(blobs, key=lambda d: (d.digest not in first, -d.size))
        futures = {d.digest: pool.submit(download, client, ref.repository, d, cache, bar.update)
                   for d in ordered}
        try:
            if meanwhile is not None:
                meanwhile(lambda: {digest: futures[digest].result() for digest in first})
            return {digest: future.result() for digest, future in futures.items()}
        except BaseException:
            for future in futures.values():
                future.cancel()
            raise


def _has(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False
