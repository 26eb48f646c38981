"""graft.load maps a stored tensor blob copy-on-write once the store trusts its fingerprint
(small ones are read instead): no copy at load, and nothing a user does to the loaded
tensors reaches the store."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import torch

import graft
from graft.hub import index
from graft.hub.store import Store
from graft.runtime.load import _MAP_MIN

_MAPS = Path("/proc/self/maps")


def _mapped_files() -> list[tuple[int, int, str]]:
    """(start, end, path) of every file mapping of this process."""
    out = []
    for line in _MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end, fields[5]))
    return out


def _backing_file(tensor: torch.Tensor, maps: list[tuple[int, int, str]]) -> str | None:
    address = tensor.untyped_storage().data_ptr()
    return next((path for start, end, path in maps if start <= address < end), None)


class Wide(torch.nn.Module):
    """One weight above the mapping threshold (128 KiB), the rest below it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(64, 512)
        self.head = torch.nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


@pytest.fixture
def saved(graft_home: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Wide, Store]:
    torch.manual_seed(0)
    model = Wide()
    graft.save(model, "tiny-cnn@1.0.0", example_inputs=(torch.randn(2, 64),))
    # The loads below happen "later": a fingerprint taken within RACY_NS of a blob's change
    # is never trusted (docs/store.md), and a test should not sleep past it.
    monkeypatch.setattr(index, "now_ns", lambda: time.time_ns() + 2 * index.RACY_NS)
    return model, Store(graft_home)


@pytest.mark.skipif(not _MAPS.exists(), reason="needs /proc/self/maps (Linux) to see mappings")
def test_a_trusted_blob_is_mapped_from_the_store_not_copied(saved: tuple[Wide, Store]) -> None:
    model, store = saved
    tensors = store.resolve("tiny-cnn").manifest().tensors
    graft.load("tiny-cnn")  # the store hashes each blob once and records its fingerprint
    module = graft.load("tiny-cnn")
    maps = _mapped_files()
    state = module.weights.state_dict()
    expected = model.state_dict()
    sizes = {name: state[name].numel() * state[name].element_size() for name in tensors}
    assert max(sizes.values()) >= _MAP_MIN > min(sizes.values())  # both kinds are here
    for name, entry in tensors.items():
        tensor = state[name]
        assert torch.equal(tensor, expected[name]), name
        backing = _backing_file(tensor, maps)
        if sizes[name] >= _MAP_MIN:
            assert backing is not None and os.path.samefile(
                backing, store.blob_path(entry.sha256)), (name, backing)
        else:  # read into its own allocation: a mapping would cost more than the copy
            assert backing is None or not os.path.samefile(
                backing, store.blob_path(entry.sha256)), (name, backing)


def test_writes_into_loaded_tensors_never_reach_the_store(saved: tuple[Wide, Store]) -> None:
    model, store = saved
    tensors = store.resolve("tiny-cnn").manifest().tensors
    blobs = {name: store.blob_path(e.sha256) for name, e in tensors.items()}
    before = {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in blobs.items()}
    graft.load("tiny-cnn")
    module = graft.load("tiny-cnn", trainable=True)
    other = graft.load("tiny-cnn")  # a second load of the same blobs, mapped too
    with torch.no_grad():
        for param in module.parameters():
            param.add_(1.0)  # in place, the way an optimizer writes
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    module.train()
    module(torch.randn(4, 64)).sum().backward()
    optimizer.step()

    after = {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in blobs.items()}
    assert after == before
    store.verify("tiny-cnn")
    for name, value in model.state_dict().items():
        assert torch.equal(other.weights.state_dict()[name], value), name
        assert torch.equal(graft.load("tiny-cnn").weights.state_dict()[name], value), name


def test_file_path_reads_whole_files_in_place_and_rebuilds_blob_files(
        saved: tuple[Wide, Store]) -> None:
    _, store = saved
    module = graft.load("tiny-cnn")
    manifest = module.manifest
    program = next(rel for rel in manifest.files if rel.startswith("programs/"))
    reference = next(rel for rel in manifest.files if rel.startswith("reference/"))
    tree = store.resolve("tiny-cnn").path

    assert module.file_path(program) == (tree / program).resolve()
    assert module._on_demand._path is None  # nothing was written out for a whole file
    rebuilt = module.file_path(reference)  # kept as tensor blobs: the file is rebuilt
    assert not (tree / reference).exists()
    assert hashlib.sha256(rebuilt.read_bytes()).hexdigest() == manifest.files[reference].sha256
    with pytest.raises(FileNotFoundError, match="no file 'nope.txt'"):
        module.file_path("nope.txt")
