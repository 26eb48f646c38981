"""A pull hands its verified downloads to the store as blobs (``Store.add_blobs``): each byte
is written once, damaged local copies are fetched again, and blobs that are not the module
leave nothing behind."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graft
from graft.errors import GraftError
from graft.hub.oci import pull, push
from graft.hub.oci.artifact import build_manifest, parse_header
from graft.hub.store import Store
from graft.hub.tensorfiles import FileLayout
from tests.conftest import env_with_src


def _written() -> int:
    """Bytes this process has passed to write(2) so far (all threads), from /proc."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_a_pull_writes_each_byte_once(registry, local, saved, tmp_path):
    pushed = push("net@1.0.0", registry.ref("once/net"), store=local)
    fresh = Store(tmp_path / "fresh")
    size = saved.parent_manifest.size
    before = _written()
    stored = pull(pushed.reference, store=fresh, progress=False)
    written = _written() - before
    assert stored.digest == saved.parent_manifest.digest
    # Downloaded once into the cache and linked into the store: about the module's bytes
    # (plus the index and records), where assembling a module directory and adding it wrote
    # them three times.
    assert size <= written < 1.5 * size, (written, size)
    assert not list((fresh.root / "oci-cache" / "blobs").iterdir())  # nothing left behind
    assert fresh.verify("net@1.0.0").digest == stored.digest
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(graft.load("net@1.0.0", store=fresh)(x),
                                   graft.load(saved.parent)(x), rtol=0, atol=0)


def test_a_damaged_parent_blob_is_fetched_again_and_repaired(registry, local, saved,
                                                              tmp_path):
    parent = push("net@1.0.0", registry.ref("repair/net"), store=local)
    child = push("net-pets@1.0.0", registry.ref("repair/net-pets"), store=local)
    fresh = Store(tmp_path / "fresh")
    pull(parent.reference, store=fresh)
    shared = saved.parent_manifest.tensors["big.weight"].sha256
    assert saved.child_manifest.tensors["big.weight"].sha256 == shared
    blob = fresh.blob_path(shared)
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF  # same size, other bytes: only a hash sees it
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))

    stored = pull(child.reference, store=fresh)
    assert stored.digest == saved.child_manifest.digest
    assert fresh.verify("net-pets@1.0.0").digest == stored.digest
    assert fresh.verify("net@1.0.0").digest == saved.parent_manifest.digest  # repaired too
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == shared


def _as_blobs(directory: Path, manifest):
    """What a pull would hand the store for a module directory: each safetensors file's
    layout and where every blob's bytes are (byte ranges of the directory's files)."""
    _, plan, sources = build_manifest(manifest, directory)
    layouts = {}
    for rel, split in plan.tensor_files.items():
        path, start, end = sources[split.header.digest]
        with open(path, "rb") as f:
            f.seek(start)
            header = f.read(end - start)
        by_name = dict(split.tensors)
        order = parse_header(header, {name: d.size for name, d in split.tensors})
        layouts[rel] = FileLayout((split.header.hex, split.header.size),
                                  tuple((n, by_name[n].hex, by_name[n].size)
                                        for n, _, _ in order))
    return layouts, {digest.removeprefix("sha256:"): source
                     for digest, source in sources.items()}


def _no_fetch(missing):
    raise AssertionError(f"nothing should be fetched: {missing}")


def test_blobs_from_a_directory_make_the_module_add_makes(saved, tmp_path):
    layouts, sources = _as_blobs(saved.parent, saved.parent_manifest)
    by_blobs = Store(tmp_path / "blobs")
    stored = by_blobs.add_blobs(saved.parent_manifest, layouts, sources, _no_fetch)
    by_add = Store(tmp_path / "add")
    added = by_add.add(saved.parent)
    assert stored.digest == added.digest == saved.parent_manifest.digest
    assert _files(by_blobs.root / "blobs") == _files(by_add.root / "blobs")
    assert by_blobs.verify("net@1.0.0").digest == stored.digest
    # adding it again is a no-op that returns the stored entry
    assert by_blobs.add_blobs(saved.parent_manifest, layouts, sources, _no_fetch).digest \
        == stored.digest


def test_blobs_that_are_not_the_module_leave_nothing(saved, tmp_path):
    layouts, sources = _as_blobs(saved.parent, saved.parent_manifest)
    store = Store(tmp_path / "store")
    store.add_blobs(saved.parent_manifest, layouts, sources, _no_fetch)
    before = _files(store.root / "blobs")
    # The child's manifest with the parent's blobs: its head tensors are nowhere, and the
    # blob fetched for them is other bytes.
    child_layouts, child_sources = _as_blobs(saved.child, saved.child_manifest)
    head = saved.child_manifest.tensors["head.weight"].sha256
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"\0" * child_sources[head][2])
    del child_sources[head]
    with pytest.raises(GraftError, match="digest"):
        store.add_blobs(saved.child_manifest, child_layouts, child_sources,
                        lambda missing: {sha: wrong for sha, _ in missing})
    assert [m.name for m in store.list()] == ["net"]
    assert _files(store.root / "blobs") == before
    assert len(list((store.root / "modules").iterdir())) == 1
    # A header that does not describe the weights: refused by the tree check, nothing kept.
    weights = dict(child_layouts)["weights.safetensors"]
    other = tmp_path / "other-header"
    header = bytearray(Path(sources[layouts["weights.safetensors"].header[0]][0])
                       .read_bytes()[:layouts["weights.safetensors"].header[1]])
    forged = FileLayout((hashlib.sha256(bytes(header)).hexdigest(), len(header)),
                        weights.tensors)
    other.write_bytes(bytes(header))
    child_sources = dict(_as_blobs(saved.child, saved.child_manifest)[1])
    child_sources[forged.header[0]] = (other, 0, len(header))
    with pytest.raises(GraftError):
        store.add_blobs(saved.child_manifest, {**child_layouts, "weights.safetensors": forged},
                        child_sources, _no_fetch)
    assert [m.name for m in store.list()] == ["net"]
    assert _files(store.root / "blobs") == before


def test_a_pull_killed_while_storing_leaves_nothing_visible(registry, local, saved, tmp_path):
    pushed = push("net@1.0.0", registry.ref("killed/net"), store=local)
    home = tmp_path / "home"
    env = {**env_with_src(), "GRAFT_HOME": str(home),
           "GRAFT_TEST_STOP_AT": "add.blob-placed#3"}
    killed = subprocess.run([sys.executable, "-m", "graft.cli", "pull", pushed.reference],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    store = Store(home)
    assert store.list() == []
    stored = pull(pushed.reference, store=store)
    assert store.verify(stored.pinned_handle).digest == saved.parent_manifest.digest
    store.gc(downloads=True)
    assert not [p for p in (home / "tmp").iterdir() if not p.name.endswith(".lock")]


class _WithConstant(torch.nn.Module):
    """A model whose program holds a lifted tensor constant (kept whole by the store, sent
    as header and tensor blobs)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.scale = torch.tensor([0.5, 2.0, -1.0])  # not a buffer: a program constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


def test_a_program_constant_file_is_stored_whole(registry, tmp_path):
    torch.manual_seed(0)
    model = _WithConstant().eval()
    saved = graft.save(model, tmp_path / "const", name="const", version="1.0.0",
                       example_inputs=(torch.randn(2, 4),))
    manifest = graft.load(saved.path).manifest
    constants = [rel for rel in manifest.files if rel.endswith(".constants.safetensors")]
    assert constants, sorted(manifest.files)
    local = Store(tmp_path / "local")
    local.add(saved.path)
    pushed = push("const@1.0.0", registry.ref("const/net"), store=local)
    fresh = Store(tmp_path / "fresh")
    stored = pull(pushed.reference, store=fresh)
    for rel in constants:
        entry = manifest.files[rel]
        assert fresh.blob_path(entry.sha256).stat().st_size == entry.size
    assert fresh.verify(stored.pinned_handle).digest == manifest.digest
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(graft.load("const@1.0.0", store=fresh)(x), model(x),
                                   rtol=0, atol=1e-6)
