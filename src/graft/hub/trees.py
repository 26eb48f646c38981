"""Module trees in the store: checking one on every read, and validating one fully.

A tree, ``modules/<digest hex>/``, holds a module's files as hard links to the blobs, except
its weights, which are tensor blobs with a link to their header (hub/tensors.py), and its
reference files, tensor blobs listed in the tree's record (hub/tensorfiles.py). Reading a
module back checks its tree against the digest the index recorded (tensor blobs like tensor
files, by fingerprint):

- ``graft.json`` is parsed and its canonical digest must equal the index's;
- every small file (programs, assets: kilobytes) is hashed on every read;
- a ``*.safetensors`` file (weights: megabytes) is hashed unless its ``stat`` (size, mtime,
  ctime, inode) equals the fingerprint recorded when it was last hashed, and that hash was at
  least ``RACY_NS`` after the file last changed. Any write to the file changes its ctime,
  which no user can set back, so an edit is hashed and caught. See docs/store.md.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import AbstractSet, Callable

from graft.errors import IntegrityError
from graft.format.manifest import MANIFEST_NAME, Manifest
from graft._fs import sha256_stream
from graft.hub.blobs import open_regular
from graft.hub import tensorfiles, tensors
from graft.hub.index import Fingerprint, now_ns

__all__ = ["LEVELS", "check_tree", "fingerprinted", "validate_tree"]

#: How hard :func:`check_tree` looks: ``sizes`` (stat only, for listings), ``read`` (what
#: every load does) and ``full`` (hash everything, for verify and repair).
LEVELS = ("sizes", "read", "full")


def fingerprinted(rel: str) -> bool:
    """Whether a file may be vouched for by its metadata instead of a hash (tensor files)."""
    return rel.endswith(".safetensors")


def check_tree(tree: Path, digest: str, recorded: dict[str, Fingerprint], *,
               level: str = "read", blob_file: Callable[[str], str] | None = None,
               header_sha256: str | None = None, defer_blobs: bool = False
               ) -> tuple[Manifest, dict[str, Fingerprint]]:
    """Check a stored tree against the digest its index row records.

    Args:
        tree: The module tree.
        digest: ``sha256:<hex>`` the index records for it.
        recorded: Fingerprints of its tensor files when they were last hashed, and of its
            tensor blobs (keyed by ``tensors.blob_key``).
        level: One of :data:`LEVELS`.
        blob_file: The store's hex sha256 -> blob path; needed for a tree whose weights are
            tensor blobs (hub/tensors.py): its header is hashed on every check, its blobs
            checked like tensor files.
        header_sha256: The weights header the index recorded; at ``read`` and ``sizes``
            the header is then only hashed against it, not parsed (the loader builds
            tensors from the manifest and the blobs; the header says only where each sat in
            the file).
        defer_blobs: With ``header_sha256`` at ``read``: leave the tensor blobs to the
            caller, who reads and checks each (``tensors.read_checked``).

    Returns:
        The manifest, and fresh fingerprints of the tensor files this call hashed and found
        intact (the caller records them).

    Raises:
        IntegrityError, FormatError, UnsafeContentError, ModuleNotFound: the tree is damaged.
    """
    tree = tree.resolve()  # once: every file below is opened under it
    open_regular(tree, MANIFEST_NAME, resolved=True).close()  # a FIFO must not block a read
    manifest = Manifest.read(tree)
    if manifest.digest != digest:
        raise IntegrityError(f"its {MANIFEST_NAME} has digest {manifest.digest}, but the store "
                             f"records {digest} for it")
    fresh: dict[str, Fingerprint] = {}
    split = tensors.is_split(tree)
    if split:
        if blob_file is None:
            raise IntegrityError("its weights are stored as tensor blobs; open it through the "
                                 "store (Store.open, Store.export)")
        if level != "full" and header_sha256 is not None:
            tensors.check_header(tree, header_sha256)
            if not defer_blobs:
                fresh.update(tensors.check_blobs(blob_file, tensors.manifest_tensors(manifest),
                                                 recorded, level, now_ns, Fingerprint))
        else:
            # parsed: it must describe exactly the manifest's tensors; at ``full`` the file
            # the blobs rebuild must hash to the manifest's sha256 (covering the header)
            layout = tensors.read_layout(tree, manifest)
            whole = hashlib.sha256(layout.header) if level == "full" else None
            fresh.update(tensors.check_blobs(blob_file, list(layout.tensors), recorded, level,
                                             now_ns, Fingerprint, whole))
            if whole is not None and whole.hexdigest() != manifest.files[tensors.WEIGHTS].sha256:
                raise IntegrityError(f"its {tensors.WEIGHTS}, rebuilt from the header and "
                                     "tensor blobs, does not match its sha256 in the manifest: "
                                     "the header was altered")
    if blob_file is not None:
        split_files = tensorfiles.read_record(tree, manifest)
        for rel, layout in split_files.items():
            fresh.update(tensorfiles.check(blob_file, rel, layout, manifest.files[rel],
                                           recorded, level, now_ns, Fingerprint))
    elif os.path.lexists(tree / tensorfiles.RECORD):
        raise IntegrityError("its reference files are stored as tensor blobs; open it "
                             "through the store (Store.open, Store.export)")
    else:
        split_files = {}
    for rel, entry in manifest.files.items():
        if (split and rel == tensors.WEIGHTS) or rel in split_files:
            continue
        checked = now_ns()  # before fstat: a change after it then always counts as racy
        with open_regular(tree, rel, resolved=True) as f:
            st = os.fstat(f.fileno())
            if st.st_size != entry.size:
                raise IntegrityError(f"{rel} is {st.st_size} bytes but the manifest records "
                                     f"{entry.size}: the file is truncated or altered")
            if level == "sizes":
                continue
            vouched = recorded.get(rel)
            if fingerprinted(rel) and level == "read" and vouched and vouched.vouches_for(st):
                continue
            if sha256_stream(f) != entry.sha256:
                raise IntegrityError(f"{rel} does not match its sha256 in the manifest: the "
                                     "file was altered")
            if fingerprinted(rel):
                fresh[rel] = Fingerprint.of(st, checked)
    return manifest, fresh


def validate_tree(tree: Path, blob_file: Callable[[str], str] | None = None, *,
                  checked_programs: AbstractSet[str] = frozenset()
                  ) -> tuple[Manifest, dict[str, Fingerprint]]:
    """Validate a tree that has no index row as completely as ``Store.add`` validates a
    module: every byte hashed, every file regular, every program checked.

    Args:
        checked_programs: sha256s of program files that ``check_programs`` passed for this
            manifest already (a pull checks its downloads while the rest arrive); the tree's
            files are hashed against the manifest here, so these are the same bytes.

    Returns:
        The manifest and fingerprints of its tensor files.

    Raises:
        GraftError (IntegrityError, FormatError, ...) or OSError: it is not a valid module,
            or its folder name is not its digest.
    """
    from graft.format.files import check_file
    from graft.format.manifest import resolve_inside
    from graft.format.validate import check_module, check_programs  # only for adoption

    digest = "sha256:" + tree.name
    manifest, fresh = check_tree(tree, digest, {}, level="full", blob_file=blob_file)
    split_files = tensorfiles.read_record(tree, manifest) if blob_file is not None else {}
    if not tensors.is_split(tree) and not split_files:
        check_module(tree, manifest, hash_contents=False)  # every byte was hashed just now
        return manifest, fresh
    # The weights and reference files are blobs whose headers and tensors check_tree just
    # matched against the manifest (each header parsed as check_file parses a safetensors
    # file); every other file gets check_module's checks.
    root = tree.resolve()
    for rel in manifest.files:
        if rel not in split_files and not (rel == tensors.WEIGHTS and tensors.is_split(tree)):
            check_file(resolve_inside(root, rel), rel)
    check_programs(tree, manifest, done=checked_programs)
    return manifest, fresh
