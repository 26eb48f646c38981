"""Fixtures for the hub tests: small fake module directories and an empty store."""

from __future__ import annotations

import hashlib
import itertools
import random
from pathlib import Path
from typing import Callable, Mapping

import pytest

from graft.hub.store import Store
from graft.format.manifest import FileEntry, Manifest, Parent
from graft.format.spec import SignatureSpec

PROGRAM = "programs/forward.eval.json"
WEIGHTS = "weights.safetensors"


def write_module(directory: Path, name: str, version: str, contents: Mapping[str, bytes],
                 parents: tuple[Parent, ...] = ()) -> Manifest:
    """Write a module directory whose files hold ``contents`` (the store never loads them)."""
    directory.mkdir(parents=True)
    files = {}
    for rel, data in contents.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[rel] = FileEntry(hashlib.sha256(data).hexdigest(), len(data))
    signature = SignatureSpec(inputs={"x": "float32[batch,4]"},
                              outputs={"y": "float32[batch,2]"},
                              programs={"eval": PROGRAM})
    manifest = Manifest(name=name, version=version, signatures={"forward": signature},
                        default_signature="forward", files=files, tensors={},
                        parents=tuple(parents))
    manifest.write(directory)
    return manifest


@pytest.fixture
def make_module(tmp_path: Path) -> Callable[..., Path]:
    """Build a fake module directory: random weights and program bytes, deterministic per
    call. ``contents`` replaces or adds files (e.g. to share a blob with another module)."""
    counter = itertools.count()

    def make(name: str = "tiny", version: str = "1.0.0", *,
             contents: Mapping[str, bytes] | None = None,
             parents: tuple[Parent, ...] = ()) -> Path:
        n = next(counter)
        rng = random.Random(f"{name}@{version}#{n}")
        files = {WEIGHTS: rng.randbytes(4096), PROGRAM: rng.randbytes(300),
                 "assets/labels.txt": f"a\nb\n{n}\n".encode()}
        files.update(contents or {})
        directory = tmp_path / "sources" / f"{name}-{version}-{n}"
        write_module(directory, name, version, files, parents)
        return directory

    return make


@pytest.fixture
def module_writer() -> Callable[..., Manifest]:
    """:func:`write_module`, for tests that build their own modules."""
    return write_module


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """An empty store (its root does not exist yet)."""
    return Store(tmp_path / "home")

