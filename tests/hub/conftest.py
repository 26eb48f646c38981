"""Fixtures for the hub tests: small, valid module directories built without torch, and an
empty store.

Each module is ``y = linear(x)`` over a 2x4 weight: a real safetensors file and a real
``graft.graph/1`` program, so that the entry check (every program validated) passes, while
the bytes differ from module to module (random weights, a per-module node name) so that the
store's sharing of blobs is visible.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import struct
from pathlib import Path
from typing import Callable, Mapping

import pytest

from graft.format.entries import FileEntry, Parent, TensorEntry
from graft.format.manifest import Manifest
from graft.format.spec import SignatureSpec
from graft.hub.store import Store

PROGRAM = "programs/forward.eval.json"
WEIGHTS = "weights.safetensors"


def random_bytes(size: int) -> bytes:
    """``size`` random bytes that never open like a pickle (0x80 0x0N) or a zip (PK)."""
    return b"#" + os.urandom(size - 1)


def program_bytes(tag: str = "0") -> bytes:
    """A valid eval program, ``linear(input, weight, bias)``; ``tag`` names its node, so two
    tags give two different files."""
    node = f"linear_{tag}"
    return json.dumps({
        "format": "graft.graph/1",
        "inputs": [{"kind": "parameter", "name": "p_weight", "target": "weight"},
                   {"kind": "parameter", "name": "p_bias", "target": "bias"},
                   {"kind": "input", "name": "input"}],
        "nodes": [{"args": [{"ref": "input"}, {"ref": "p_weight"}, {"ref": "p_bias"}],
                   "kwargs": {}, "name": node, "target": "aten.linear.default"}],
        "outputs": [{"kind": "output", "value": {"ref": node}}],
    }, sort_keys=True, separators=(",", ":")).encode()


def weights_bytes(seed: object, extra: int = 0) -> bytes:
    """A valid safetensors file with ``weight`` (2x4), ``bias`` (2) and, when ``extra`` > 0,
    an ``extra`` float32 vector of that many elements, all random (finite) for ``seed``."""
    rng = random.Random(str(seed))
    shapes = {"weight": [2, 4], "bias": [2], **({"extra": [extra]} if extra else {})}
    header, data = {}, b""
    for name, shape in shapes.items():
        count = 1
        for d in shape:
            count *= d
        values = struct.pack(f"<{count}f", *(rng.uniform(-1, 1) for _ in range(count)))
        header[name] = {"dtype": "F32", "shape": shape,
                        "data_offsets": [len(data), len(data) + len(values)]}
        data += values
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the header is padded to 8 bytes
    return struct.pack("<Q", len(text)) + text + data


def _tensors(weights: bytes) -> dict[str, TensorEntry]:
    """The manifest's tensor entries for a safetensors file (float32 tensors only)."""
    (size,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8:8 + size])
    body = weights[8 + size:]
    return {name: TensorEntry("parameter", "float32", tuple(info["shape"]),
                              hashlib.sha256(body[slice(*info["data_offsets"])]).hexdigest())
            for name, info in header.items() if name != "__metadata__"}


def write_module(directory: Path, name: str, version: str, contents: Mapping[str, bytes],
                 parents: tuple[Parent, ...] = ()) -> Manifest:
    """Write a module directory whose files hold ``contents`` (``weights.safetensors`` must
    be a safetensors file holding ``weight`` and ``bias``)."""
    directory.mkdir(parents=True)
    files = {}
    for rel, data in contents.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[rel] = FileEntry(hashlib.sha256(data).hexdigest(), len(data))
    signature = SignatureSpec(inputs={"input": "float32[batch,4]"},
                              outputs={"output": "float32[batch,2]"},
                              programs={"eval": PROGRAM})
    manifest = Manifest(name=name, version=version, signatures={"forward": signature},
                        default_signature="forward", files=files,
                        tensors=_tensors(contents[WEIGHTS]), parents=tuple(parents))
    manifest.write(directory)
    return manifest


@pytest.fixture
def make_module(tmp_path: Path) -> Callable[..., Path]:
    """Build a module directory: random weights, its own program and labels, deterministic
    per call. ``contents`` replaces or adds files (e.g. to share a blob with another
    module)."""
    counter = itertools.count()

    def make(name: str = "tiny", version: str = "1.0.0", *,
             contents: Mapping[str, bytes] | None = None,
             parents: tuple[Parent, ...] = ()) -> Path:
        n = next(counter)
        tag = f"{name}@{version}#{n}"
        files = {WEIGHTS: weights_bytes(tag, extra=1000),
                 PROGRAM: program_bytes(hashlib.sha256(tag.encode()).hexdigest()[:12]),
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
