"""`graft import-head`: a head file from the page becomes a child module of its backbone;
malformed or mismatched files are refused with a clear error and nothing is stored."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import graft
from graft.cli import main
from graft.errors import ExportError, FormatError
from graft.export.head import import_head, read_head
from tests.conftest import Pool

CLASSES = ["cat", "dog", "other"]


@pytest.fixture
def backbone(images) -> graft.Module:
    torch.manual_seed(0)
    pre = graft.ImagePreprocess(size=16, resize=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    graft.save(Pool(), "pool@1.0.0", signatures={"features": graft.Signature(
        "features", inputs={"images": "float32[batch,3,16,16]"}, outputs=["features"],
        example_inputs=(images,), preprocess=pre)})
    return graft.load("pool@1.0.0")


@pytest.fixture
def head_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"weight": torch.randn(3, 4, generator=g), "bias": torch.randn(3, generator=g)}


def _metadata(backbone, **changes) -> dict[str, str]:
    """The header metadata the page writes: strings as they are, the rest as JSON."""
    meta = {"format": "graft.head/1", "classes": json.dumps(CLASSES),
            "parent": f"{backbone.name}@{backbone.version}", "parent_digest": backbone.digest,
            "signature": "features", "steps": "100", "loss": "0.0123"}
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def _write(path: Path, tensors, metadata) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_child_classifies_as_head_over_features(backbone, head_tensors, images, tmp_path):
    path = _write(tmp_path / "head.safetensors", head_tensors, _metadata(backbone))
    saved = import_head(path, parent="pool@1.0.0", out="pets@1.0.0")
    child = graft.load("pets@1.0.0")
    assert saved.digest == child.digest
    with torch.no_grad():
        features = backbone.call("features", images)  # (B, 4)
        expected = features @ head_tensors["weight"].T + head_tensors["bias"]
        got = child.call("classify", images)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    # Lineage and the backbone's tensors, byte for byte.
    assert [(p.handle, p.digest) for p in child.manifest.parents] == [
        ("pool@1.0.0", backbone.digest)]
    parent = {t.sha256 for t in backbone.manifest.tensors.values()}
    shared = [t for k, t in child.manifest.tensors.items() if k.startswith("backbone.")]
    assert len(shared) == len(backbone.manifest.tensors) and all(t.sha256 in parent for t in shared)
    assert child.asset_path("labels.txt").read_text().splitlines() == CLASSES
    assert child.manifest.signatures["classify"].preprocess == \
        backbone.manifest.signatures["features"].preprocess
    assert child.manifest.metadata["head"]["steps"] == 100


def test_json_head_gives_the_same_module(backbone, head_tensors, tmp_path):
    a = _write(tmp_path / "head.safetensors", head_tensors, _metadata(backbone))
    doc = {k: json.loads(v) if k in ("classes", "steps", "loss") else v
           for k, v in _metadata(backbone).items()}
    doc.update({"weight": head_tensors["weight"].tolist(), "bias": head_tensors["bias"].tolist()})
    b = tmp_path / "head.json"
    b.write_text(json.dumps(doc))
    first, second = read_head(a), read_head(b)
    assert first.classes == second.classes == tuple(CLASSES)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)


def test_cli_imports_and_reports_one_line_errors(backbone, head_tensors, tmp_path, capsys):
    path = _write(tmp_path / "head.safetensors", head_tensors, _metadata(backbone))
    assert main(["import-head", str(path), "--parent", "pool", "--out", "pets@2.0.0"]) == 0
    assert "imported pets@2.0.0 sha256:" in capsys.readouterr().out
    assert main(["import-head", str(tmp_path / "missing.safetensors"), "--parent", "pool",
                 "--out", "pets@3.0.0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"graft import-head: error: head file {tmp_path / 'missing.safetensors'} " \
                  "does not exist"


def _bad_files(backbone, head_tensors, tmp_path) -> dict[str, tuple[Path, type, str]]:
    t = head_tensors
    meta = _metadata(backbone)
    cases = {
        "wrong width": (_write(tmp_path / "a", {"weight": torch.randn(3, 5), "bias": t["bias"]},
                               meta), ExportError, "takes 5-d features"),
        "nan": (_write(tmp_path / "b", {"weight": t["weight"] * float("nan"), "bias": t["bias"]},
                       meta), FormatError, "NaN or infinite"),
        "float64": (_write(tmp_path / "c", {k: v.double() for k, v in t.items()}, meta),
                    FormatError, "not float32"),
        "extra tensor": (_write(tmp_path / "d", {**t, "code": torch.zeros(1)}, meta),
                         FormatError, "holds tensors"),
        "other backbone": (_write(tmp_path / "e", t, _metadata(
            backbone, parent_digest="sha256:" + "0" * 64)), ExportError, "not on pool@1.0.0"),
        "classes count": (_write(tmp_path / "f", t, _metadata(
            backbone, classes=json.dumps(["cat", "dog"]))), FormatError, "must list 3 names"),
        "repeated class": (_write(tmp_path / "g", t, _metadata(
            backbone, classes=json.dumps(["cat", "cat", "dog"]))), FormatError, "repeat"),
        "newline in class": (_write(tmp_path / "h", t, _metadata(
            backbone, classes=json.dumps(["cat", "dog\nx", "o"]))), FormatError, "one line"),
        "other format": (_write(tmp_path / "i", t, _metadata(backbone, format="graft.head/9")),
                         FormatError, "graft.head/9"),
        "unknown signature": (_write(tmp_path / "j", t, _metadata(backbone, signature="zzz")),
                              ExportError, "signature 'zzz'"),
    }
    pickled = tmp_path / "k"
    pickled.write_bytes(pickle.dumps(t))
    cases["pickle"] = (pickled, FormatError, "not a head the page wrote")
    truncated = tmp_path / "l"
    truncated.write_bytes((cases["nan"][0]).read_bytes()[:-7])
    cases["truncated"] = (truncated, FormatError, "not a head the page wrote")
    bad_json = tmp_path / "m"
    bad_json.write_text('{"weight": [[1, 2], [3]], "bias": [0, 0], "classes": ["a", "b"]}')
    cases["ragged json"] = (bad_json, FormatError, "rectangular")
    return cases


def test_bad_head_files_are_refused_and_nothing_is_stored(backbone, head_tensors, tmp_path):
    store = graft.Store()
    before = [(m.name, m.version) for m in store.list()]
    for case, (path, error, text) in _bad_files(backbone, head_tensors, tmp_path).items():
        with pytest.raises(error, match=text):
            import_head(path, parent="pool@1.0.0", out="bad@1.0.0")
        assert [(m.name, m.version) for m in store.list()] == before, case
