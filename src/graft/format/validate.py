"""Checking a module directory before anything is built from it (no torch).

This is the entry check that ``graft.save``, ``Store.add``, ``graft.load`` of a directory and
``graft verify`` share: files, pickles and code, and every program validated completely
(``graft.format.graph``), so that a hostile program is refused when it enters, not when it is
first called.
"""

from __future__ import annotations

from pathlib import Path
from typing import AbstractSet as Set, Mapping

from graft.errors import FormatError
from graft.format.files import check_file, read_regular
from graft.format.graph import MAX_PROGRAM_BYTES, read_graph
from graft.format.manifest import Manifest, resolve_inside

__all__ = ["check_module", "check_programs", "program_files"]


def check_module(directory: Path, manifest: Manifest, *, hash_contents: bool) -> None:
    """Check every file's presence, size (and sha256) and refuse code or pickles.

    Args:
        hash_contents: Also compare every file's sha256 with the manifest.
    """
    manifest.verify_files(directory, hash_contents=hash_contents)
    root = Path(directory).resolve()
    for rel in manifest.files:
        # Every file, wherever it sits: a .safetensors file must really be one (its header is
        # bounds-checked before safetensors reads it), any other is scanned whole for pickle
        # streams and zip entries (format/files.py).
        check_file(resolve_inside(root, rel), rel)
    if "weights.safetensors" not in manifest.files:
        raise FormatError(f"module {manifest.name} has no weights.safetensors")
    check_programs(directory, manifest)


def program_files(manifest: Manifest) -> dict[str, bool]:
    """The program files ``check_programs`` reads: module path -> read as a train program.

    A file that an ``eval`` variant uses is read as an eval program (it may not update
    buffers), even when a train variant shares it; one listed but unused is still read.
    """
    train: dict[str, bool] = {}
    for spec in manifest.signatures.values():
        for variant, rel in spec.programs.items():
            train[rel] = train.get(rel, True) and variant != "eval"
    for rel in manifest.files:
        if rel.startswith("programs/") and rel.endswith(".json"):
            train.setdefault(rel, True)  # listed but unused: still never admitted unchecked
    return train


def check_programs(directory: Path | None, manifest: Manifest, *,
                   files: Mapping[str, Path] | None = None,
                   done: Set[str] = frozenset()) -> set[str]:
    """Validate every program file (:func:`program_files`) completely, and what its inputs
    name.

    Args:
        directory: The module directory the program files are read from.
        files: Module path -> the file holding it, instead (a pull checks its downloads).
        done: sha256s of program files a check of this manifest already passed (the same
            bytes: the caller matched them against the manifest); they are not read again.

    Returns:
        The sha256s of the program files checked.

    Raises:
        FormatError / UnsafeContentError: a program is malformed, calls an operator outside
            the list, or takes a tensor the module does not hold.
    """
    root = Path(directory).resolve() if directory is not None else None
    checked = set()
    for rel, is_train in sorted(program_files(manifest).items()):
        if rel not in manifest.files:
            raise FormatError(f"module {manifest.name}: program {rel} is not among its files")
        checked.add(manifest.files[rel].sha256)
        if manifest.files[rel].sha256 in done:
            continue
        path = files[rel] if files is not None else resolve_inside(root, rel)
        data = read_regular(path, what=rel, max_bytes=MAX_PROGRAM_BYTES)
        graph = read_graph(data, name=rel, train=is_train)
        has_constants = rel.removesuffix(".json") + ".constants.safetensors" in manifest.files
        for entry in graph.inputs:
            if entry.kind in ("parameter", "buffer"):
                tensor = manifest.tensors.get(entry.target)
                if tensor is None or tensor.kind != entry.kind:
                    raise FormatError(f"program {rel}: input {entry.name!r} takes {entry.kind} "
                                      f"{entry.target!r}, which the manifest does not list as "
                                      f"a {entry.kind}")
            elif entry.kind == "constant" and not has_constants:
                raise FormatError(f"program {rel}: input {entry.name!r} takes constant "
                                  f"{entry.target!r} but the module has no constants file "
                                  "for it")
    return checked
