"""Checking a module directory before anything is built from it (no torch).

This is the entry check that ``graft.save``, ``Store.add``, ``graft.load`` of a directory and
``graft verify`` share.
"""

from __future__ import annotations

from pathlib import Path

from graft.errors import FormatError
from graft.format.files import SNIFF_BYTES, refuse_code_or_pickle
from graft.format.manifest import Manifest, resolve_inside

__all__ = ["check_module"]


def check_module(directory: Path, manifest: Manifest, *, hash_contents: bool) -> None:
    """Check every file's presence, size (and sha256) and refuse code or pickles.

    Args:
        hash_contents: Also compare every file's sha256 with the manifest.
    """
    manifest.verify_files(directory, hash_contents=hash_contents)
    root = Path(directory).resolve()
    for rel in manifest.files:
        if rel.endswith(".safetensors"):
            continue  # read by safetensors alone, which never unpickles
        # Programs are parsed as strict JSON, which no pickle passes; their first bytes are
        # still checked so that a pickle is named as such. Assets get the full check.
        size = 64 if rel.startswith("programs/") and rel.endswith(".json") else SNIFF_BYTES
        with open(resolve_inside(root, rel), "rb") as f:
            refuse_code_or_pickle(rel, f.read(size))
    if "weights.safetensors" not in manifest.files:
        raise FormatError(f"module {manifest.name} has no weights.safetensors")
