"""graft.Module: callable signatures, readable programs, and hostile programs refused on entry."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import graft
from graft._fs import sha256_file
from graft.errors import FormatError, SignatureError, UnsafeContentError
from graft.format.entries import FileEntry
from graft.format.manifest import Manifest
from graft.format.spec import SignatureSpec
from graft.hub.store import Store
from graft.runtime.verify import verify_module
from tests.conftest import TinyCNN

PROGRAM = "programs/forward.eval.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("saved") / "m"
    graft.save(TinyCNN(), path, name="tiny-cnn", version="1.0.0", signatures={
        "forward": graft.Signature("forward", example_inputs=(images,)),
        "features": graft.Signature("features", example_inputs=(images,)),
    })
    return path


@pytest.fixture
def module_dir(saved: Path, tmp_path: Path) -> Path:
    """A fresh copy of one saved module per test (saving takes seconds)."""
    return Path(shutil.copytree(saved, tmp_path / "m"))


def test_signatures_maps_names_to_the_callable_views(module_dir, images):
    module = graft.load(module_dir)
    view = module.signatures["features"]
    assert view is module.signature("features")
    assert isinstance(view.spec, SignatureSpec)
    assert str(view.spec.outputs["output"]) == "float32[batch,8]"
    torch.testing.assert_close(view(images), module.call("features", images))
    assert sorted(module.signatures) == ["features", "forward"] and len(module.signatures) == 2
    assert "features" in module.signatures and "nope" not in module.signatures
    assert module.signatures.get("nope") is None
    with pytest.raises(SignatureError, match=r"no signature 'nope'; it has \['features', "
                                             r"'forward'\]"):
        module.signatures["nope"]
    # The view is an nn.Module over the shared weights: it composes and trains.
    model = nn.Sequential(module.signatures["features"], nn.Linear(8, 2))
    assert {id(p) for p in module.parameters()} <= {id(p) for p in model.parameters()}


def test_program_code_is_text_with_graft_names(module_dir):
    module = graft.load(module_dir)
    code = module.program_code("forward", "eval")
    assert code.startswith("def program(in")
    assert "torch.ops.aten.conv2d.default(" in code
    assert "n0 = " in code and "return (" in code


def _rewrite_program(directory: Path, change: Callable[[dict[str, Any]], None],
                     rel: str = PROGRAM) -> None:
    """Tamper as a careful attacker would: edit the program AND make the manifest agree."""
    graph = json.loads((directory / rel).read_bytes())
    change(graph)
    data = json.dumps(graph).encode()
    (directory / rel).write_bytes(data)
    manifest = Manifest.read(directory)
    files = dict(manifest.files)
    files[rel] = FileEntry(sha256_file(directory / rel), len(data))
    (directory / "graft.json").unlink()
    dataclasses.replace(manifest, files=files).write(directory)


def _input_name(graph: dict[str, Any]) -> None:
    user = next(i for i in graph["inputs"] if i["kind"] == "input")
    old, new = user["name"], "x=__import__('os').system('touch pwned')"
    user["name"] = new
    for node in graph["nodes"]:
        node["args"] = json.loads(json.dumps(node["args"]).replace(
            json.dumps({"ref": old}), json.dumps({"ref": new})))


def _kwarg_key(graph: dict[str, Any]) -> None:
    graph["nodes"][0]["kwargs"]["x=__import__('os').system('touch pwned')"] = 1


def _target(name: str) -> Callable[[dict[str, Any]], None]:
    def change(graph: dict[str, Any]) -> None:
        graph["nodes"][0]["target"] = name
        graph["nodes"][0]["args"] = ["/home/user/.bashrc", True, 100]
    return change


def _huge(graph: dict[str, Any]) -> None:
    graph["nodes"].insert(0, {"name": "huge", "target": "aten.zeros.default",
                              "args": [[10**6, 10**6]], "kwargs": {}})


def _eval_writes_buffer(graph: dict[str, Any]) -> None:
    buffer = next(i for i in graph["inputs"] if i["kind"] == "buffer")
    graph["nodes"].insert(0, {"name": "bump", "target": "aten.add_.Tensor",
                              "args": [{"ref": buffer["name"]}, 1], "kwargs": {}})


def _bad_reference(graph: dict[str, Any]) -> None:
    graph["nodes"][0]["args"][0] = {"ref": graph["nodes"][-1]["name"]}


def _unknown_tensor(graph: dict[str, Any]) -> None:
    next(i for i in graph["inputs"] if i["kind"] == "parameter")["target"] = "no.such.weight"


HOSTILE = {
    "input name": (_input_name, UnsafeContentError, "is not an identifier"),
    "kwarg key": (_kwarg_key, UnsafeContentError, "keyword .* is not an identifier"),
    "from_file": (_target("aten.from_file.default"), UnsafeContentError,
                  "'aten.from_file.default', which is not in Graft's operator list"),
    "dunder": (_target("prims.__dict__.__setitem__"), UnsafeContentError,
               "not in Graft's operator list"),
    "class init": (_target("aten.__class__.__init__"), UnsafeContentError,
                   "not in Graft's operator list"),
    "huge factory": (_huge, FormatError, "asks for 1000000000000 elements"),
    "eval buffer write": (_eval_writes_buffer, UnsafeContentError,
                          "only train programs may update buffers"),
    "reference": (_bad_reference, FormatError, "before defining it"),
    "unknown tensor": (_unknown_tensor, FormatError,
                       "parameter 'no.such.weight', which the manifest does not list"),
}


def _load(directory: Path) -> Any:
    return graft.load(directory)


def _add(directory: Path) -> Any:
    store = Store()
    try:
        return store.add(directory)
    finally:
        assert store.list() == []  # nothing half-added


ENTRY_POINTS = {"graft.load(dir)": _load, "Store.add": _add, "graft verify": verify_module}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_programs_are_refused_on_entry(module_dir, case, entry):
    change, error, message = HOSTILE[case]
    _rewrite_program(module_dir, change)
    with pytest.raises(error, match=message) as info:
        ENTRY_POINTS[entry](module_dir)
    assert str(info.value).startswith(f"program {PROGRAM}")
    assert not Path("pwned").exists()


def test_a_program_read_later_is_validated_again(module_dir, images):
    module = graft.load(module_dir)  # entry check passes; the program is read at first call
    _rewrite_program(module_dir, _target("aten.from_file.default"))
    with pytest.raises(UnsafeContentError, match="not in Graft's operator list"):
        module(images)


class _Det(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.det(x)


def test_save_refuses_an_operator_outside_the_list_and_writes_nothing(tmp_path):
    with pytest.raises(FormatError, match="calls aten.linalg_det.default, which is not in "
                                          "Graft's operator list"):
        graft.save(_Det(), tmp_path / "det", name="det", version="1.0.0",
                   example_inputs=(torch.randn(2, 3, 3),))
    assert list(tmp_path.iterdir()) == []
