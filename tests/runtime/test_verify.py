"""graft verify (graft.runtime.verify): a module passes only if every claim it makes holds."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import graft
from graft.errors import FormatError, GraftError, IntegrityError
from graft.runtime.verify import verify_module
from tests.conftest import TinyCNN

REF = "reference/classify.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("verify") / "tiny"
    graft.save(TinyCNN(), path, name="tiny-cnn", version="1.0.0",
               signatures={"classify": graft.Signature(
                   "forward", example_inputs=(torch.randn(2, 3, 16, 16),)),
                   "features": graft.Signature(
                   "features", example_inputs=(torch.randn(2, 3, 16, 16),))})
    return path


@pytest.fixture
def module_dir(saved: Path, tmp_path: Path) -> Path:
    """A fresh copy of the saved module, for a test to break."""
    return Path(shutil.copytree(saved, tmp_path / "tiny"))


def edit_manifest(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change graft.json (a directory module has no pinned digest to keep)."""
    path = directory / "graft.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def rewrite_reference(directory: Path, change: Callable[[dict[str, torch.Tensor]], None],
                      rel: str = REF) -> None:
    """Rewrite a reference file and record its new size and sha256, so that only its meaning
    is wrong, not its digest."""
    tensors = load_file(str(directory / rel))
    change(tensors)
    (directory / rel).unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / rel))
    data = (directory / rel).read_bytes()

    def record(manifest: dict[str, Any]) -> None:
        manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(),
                                  "size": len(data)}

    edit_manifest(directory, record)


def test_a_good_module_verifies(module_dir: Path) -> None:
    report = verify_module(module_dir)
    assert sorted(report.signatures) == ["classify", "features"]
    assert report.unchecked == [] and report.max_abs_diff <= 1e-5
    assert report.tensors == len(graft.load(module_dir).manifest.tensors) > 0


def test_a_signature_without_outputs_fails(module_dir: Path) -> None:
    def drop_outputs(manifest: dict[str, Any]) -> None:
        sig = manifest["signatures"]["classify"]
        sig["outputs"] = [] if isinstance(sig["outputs"], list) else {}
        sig.pop("structure", None)

    edit_manifest(module_dir, drop_outputs)
    with pytest.raises(GraftError, match="output"):
        verify_module(module_dir)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("input.images"), r"holds inputs \[\].*declares inputs \['images'\]"),
    (lambda t: t.pop("output.output"), r"holds outputs \[\].*declares outputs"),
    (lambda t: t.update({"input.extra": torch.zeros(1)}), r"holds inputs \['extra', 'images'\]"),
    (lambda t: t.update({"output.logits": t.pop("output.output")}), r"outputs \['logits'\]"),
    (lambda t: t.update({"weights": torch.zeros(1)}), r"unknown entries \['weights'\]"),
    (lambda t: t.update({"input.images": t["input.images"][:, :, :8]}),
     r"reference input 'images' does not match the signature"),
    (lambda t: t.update({"output.output": t["output.output"][:, :3]}),
     r"reference output 'output' does not match the signature"),
    (lambda t: t.update({"input.images": t["input.images"].double()}),
     r"reference input 'images' does not match"),
])
def test_a_reference_that_does_not_match_its_signature_fails(
        module_dir: Path, change: Callable[[dict[str, torch.Tensor]], None],
        message: str) -> None:
    rewrite_reference(module_dir, change)
    with pytest.raises(FormatError, match=message):
        verify_module(module_dir)


def test_a_reference_output_that_does_not_reproduce_fails(module_dir: Path) -> None:
    rewrite_reference(module_dir, lambda t: t["output.output"].add_(0.01))
    with pytest.raises(IntegrityError, match=r"'classify' output 'output' differs.*0\.01"):
        verify_module(module_dir)


def test_a_reference_of_no_signature_fails(module_dir: Path) -> None:
    data = (module_dir / REF).read_bytes()
    (module_dir / "reference" / "gone.safetensors").write_bytes(data)

    def add(manifest: dict[str, Any]) -> None:
        manifest["files"]["reference/gone.safetensors"] = manifest["files"][REF]

    edit_manifest(module_dir, add)
    with pytest.raises(FormatError, match="reference of no signature"):
        verify_module(module_dir)


def test_an_altered_tensor_fails(module_dir: Path) -> None:
    # Rewrite weights.safetensors with one value changed and its file digest updated: only
    # the per-tensor sha256 can tell.
    def bump(t: dict[str, torch.Tensor]) -> None:
        t["head.bias"][0] += 1.0

    rewrite_reference(module_dir, bump, rel="weights.safetensors")
    with pytest.raises(IntegrityError, match="tensor head.bias does not match its sha256"):
        verify_module(module_dir)
