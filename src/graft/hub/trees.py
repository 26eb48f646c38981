"""Module trees in the store: checking one on every read, and validating one fully.

A tree, ``modules/<digest hex>/``, is an ordinary module directory whose files are hard links
to the blobs. Reading a module back checks its tree against the digest the index recorded:

- ``graft.json`` is parsed and its canonical digest must equal the index's;
- every small file (programs, assets: kilobytes) is hashed on every read;
- a ``*.safetensors`` file (weights: megabytes) is hashed unless its ``stat`` (size, mtime,
  ctime, inode) equals the fingerprint recorded when it was last hashed, and that hash was at
  least ``RACY_NS`` after the file last changed. Any write to the file changes its ctime,
  which no user can set back, so an edit is hashed and caught. See docs/store.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from graft.errors import IntegrityError
from graft.format.manifest import MANIFEST_NAME, Manifest
from graft._fs import sha256_stream
from graft.hub.blobs import open_regular
from graft.hub.index import Fingerprint, now_ns

__all__ = ["LEVELS", "check_tree", "fingerprinted", "validate_tree"]

#: How hard :func:`check_tree` looks: ``sizes`` (stat only, for listings), ``read`` (what
#: every load does) and ``full`` (hash everything, for verify and repair).
LEVELS = ("sizes", "read", "full")


def fingerprinted(rel: str) -> bool:
    """Whether a file may be vouched for by its metadata instead of a hash (tensor files)."""
    return rel.endswith(".safetensors")


def check_tree(tree: Path, digest: str, recorded: dict[str, Fingerprint], *,
               level: str = "read") -> tuple[Manifest, dict[str, Fingerprint]]:
    """Check a stored tree against the digest its index row records.

    Args:
        tree: The module tree.
        digest: ``sha256:<hex>`` the index records for it.
        recorded: Fingerprints of its tensor files when they were last hashed.
        level: One of :data:`LEVELS`.

    Returns:
        The manifest, and fresh fingerprints of the tensor files this call hashed and found
        intact (the caller records them).

    Raises:
        IntegrityError, FormatError, UnsafeContentError, ModuleNotFound: the tree is damaged.
    """
    open_regular(tree, MANIFEST_NAME).close()  # a FIFO here must not block the reader
    manifest = Manifest.read(tree)
    if manifest.digest != digest:
        raise IntegrityError(f"its {MANIFEST_NAME} has digest {manifest.digest}, but the store "
                             f"records {digest} for it")
    fresh: dict[str, Fingerprint] = {}
    for rel, entry in manifest.files.items():
        checked = now_ns()  # before fstat: a change after it then always counts as racy
        with open_regular(tree, rel) as f:
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


def validate_tree(tree: Path) -> tuple[Manifest, dict[str, Fingerprint]]:
    """Validate a tree that has no index row as completely as ``Store.add`` validates a
    module: every byte hashed, every file regular, every program checked.

    Returns:
        The manifest and fingerprints of its tensor files.

    Raises:
        GraftError (IntegrityError, FormatError, ...) or OSError: it is not a valid module,
            or its folder name is not its digest.
    """
    from graft.format.validate import check_module  # the program reader: only for adoption

    digest = "sha256:" + tree.name
    manifest, fresh = check_tree(tree, digest, {}, level="full")
    check_module(tree, manifest, hash_contents=False)  # every byte was hashed just now
    return manifest, fresh
