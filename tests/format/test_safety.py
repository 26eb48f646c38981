"""Loading never unpickles or executes module content, and every byte is checked."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import graft
from graft.errors import FormatError, IntegrityError, PathExists, UnsafeContentError
from graft._fs import sha256_file
from graft.format.manifest import FileEntry, Manifest
from tests.conftest import TinyCNN, env_with_src


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def module_dir(tiny_cnn, images, tmp_path) -> Path:
    path = tmp_path / "m"
    graft.save(tiny_cnn, path, name="tiny-cnn", version="1.0.0", example_inputs=(images,),
               assets={"labels.txt": "a\nb\nc\nd\n"})
    return path


def _replace_file(directory: Path, rel: str, data: bytes) -> None:
    """Tamper like a careful attacker: change a file AND make the manifest consistent."""
    (directory / rel).parent.mkdir(parents=True, exist_ok=True)
    (directory / rel).write_bytes(data)
    manifest = Manifest.read(directory)
    files = dict(manifest.files)
    files[rel] = FileEntry(sha256_file(directory / rel), len(data))
    _write_manifest(directory, dataclasses.replace(manifest, files=files))


def _write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / "graft.json").unlink()
    manifest.write(directory)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_pickle_program_is_refused_and_never_runs(module_dir, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    _replace_file(module_dir, "programs/forward.eval.json", payload)
    with pytest.raises(UnsafeContentError, match="pickle"):
        graft.load(module_dir)
    assert not marker.exists()


def test_pickle_protocol0_asset_is_refused_and_never_runs(module_dir, tmp_path):
    marker = tmp_path / "pwned"
    _replace_file(module_dir, "assets/labels.txt", pickle.dumps(_Payload(marker), protocol=0))
    with pytest.raises(UnsafeContentError, match="pickle"):
        graft.load(module_dir)
    assert not marker.exists()


def test_program_calling_python_code_is_refused(module_dir, tmp_path):
    rel = "programs/forward.eval.json"
    graph = json.loads((module_dir / rel).read_bytes())
    graph["nodes"][0]["target"] = "builtins.exec"
    _replace_file(module_dir, rel, json.dumps(graph).encode())
    module = graft.load(module_dir)
    with pytest.raises(UnsafeContentError, match="builtins.exec"):
        module(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_tampered_weights_raise_integrity_error(module_dir, damage):
    path = module_dir / "weights.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
    else:
        data = data[:-100]
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="weights.safetensors"):
        graft.load(module_dir)


def test_malformed_safetensors_header_is_a_format_error(module_dir):
    _replace_file(module_dir, "weights.safetensors", b"\xff" * 8 + b"{not json")
    with pytest.raises(FormatError, match="safetensors"):
        graft.load(module_dir)


def test_unknown_format_version_is_refused(module_dir):
    data = json.loads((module_dir / "graft.json").read_text())
    data["format"] = "graft.module/99"
    (module_dir / "graft.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match="graft.module/99"):
        graft.load(module_dir)


@pytest.mark.parametrize("rel", ["../outside.txt", "/etc/passwd", "assets/../../x", "a\\..\\b"])
def test_paths_escaping_the_module_are_refused(module_dir, rel):
    data = json.loads((module_dir / "graft.json").read_text())
    data["files"][rel] = {"sha256": "0" * 64, "size": 1}
    (module_dir / "graft.json").write_text(json.dumps(data))
    with pytest.raises(UnsafeContentError, match="escapes"):
        graft.load(module_dir)


def test_symlinked_asset_is_refused(module_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("a\nb\nc\nd\n")
    (module_dir / "assets/labels.txt").unlink()
    (module_dir / "assets/labels.txt").symlink_to(secret)
    with pytest.raises(UnsafeContentError, match="link"):
        graft.load(module_dir)


def test_save_refuses_pickle_asset_and_writes_nothing(tiny_cnn, images, tmp_path):
    with pytest.raises(UnsafeContentError):
        graft.save(tiny_cnn, tmp_path / "m", name="t", version="1", example_inputs=(images,),
                   assets={"model.pkl": pickle.dumps({"a": 1})})
    assert list(tmp_path.iterdir()) == []


def test_save_over_existing_path_is_refused_and_keeps_it(module_dir, tiny_cnn, images):
    before = _snapshot(module_dir)
    with pytest.raises(PathExists):
        graft.save(tiny_cnn, module_dir, name="tiny-cnn", version="2.0.0",
                   example_inputs=(images,))
    assert _snapshot(module_dir) == before


def test_failed_export_leaves_nothing_behind(images, tmp_path):
    class Broken(TinyCNN):
        def features(self, images):
            if images.sum() > 0:  # Python control flow on tensor data cannot be exported
                return images.mean()
            return super().features(images)

    with pytest.raises(FormatError, match="cannot be exported"):
        graft.save(Broken(), tmp_path / "m", name="b", version="1",
                   signatures={"features": graft.Signature("features", example_inputs=(images,))})
    assert list(tmp_path.iterdir()) == []


_SAVER = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import TinyCNN
import graft
torch.manual_seed(0)
model = TinyCNN()
print("ready", flush=True)
graft.save(model, {target!r}, name="killed", version="1.0.0",
           signatures={{"classify": graft.Signature("forward", example_inputs=(torch.randn(2, 3, 16, 16),)),
                       "features": graft.Signature("features", example_inputs=(torch.randn(2, 3, 16, 16),))}})
print("saved", flush=True)
"""


@pytest.mark.parametrize("delay", [0.5, 1.5, 3.0])
def test_sigkill_during_save_never_leaves_a_half_module(tmp_path, delay):
    target = tmp_path / "out" / "killed"
    script = _SAVER.format(tests=str(Path(__file__).parents[1]), target=str(target))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            env=env_with_src(), text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    if target.exists():  # finished before the kill: it must be whole
        graft.load(target)
    else:
        assert not (tmp_path / "out").exists() or all(
            p.name.startswith(".killed.partial-") for p in (tmp_path / "out").iterdir())


def test_text_that_merely_looks_like_an_opcode_is_accepted(tiny_cnn, images, tmp_path):
    graft.save(tiny_cnn, tmp_path / "m", name="t", version="1", example_inputs=(images,),
               assets={"labels.txt": "cat\ndog\nother\n"})
    assert graft.load(tmp_path / "m").asset_path("labels.txt").read_text() == "cat\ndog\nother\n"


def test_the_store_refuses_a_pickle_asset_and_stores_nothing(module_dir, tmp_path):
    marker = tmp_path / "pwned"
    _replace_file(module_dir, "assets/labels.txt", pickle.dumps(_Payload(marker)))
    store = graft.Store()
    with pytest.raises(UnsafeContentError, match="pickle"):
        store.add(module_dir)
    assert store.list() == [] and not marker.exists()
    assert not [p for p in store.root.rglob("*") if p.is_file() and "blobs" in p.parts]
