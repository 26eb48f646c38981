"""`graft export onnx`: dynamic batch (and sequence), preprocessing beside the model, parity
with PyTorch checked on export and refused when it fails, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import graft
from graft.cli import main
from graft.errors import ExportError, SignatureError
from graft.export import onnx as graft_onnx
from graft.export.onnx import export_onnx, onnx_session
from tests.conftest import token_batch


@pytest.fixture(scope="module")
def cnn_module(tmp_path_factory) -> Path:
    """TinyCNN saved with image preprocessing and labels, as a module directory."""
    from tests.conftest import TinyCNN

    torch.manual_seed(0)
    model = TinyCNN()
    model.bn1.running_mean.uniform_(-0.5, 0.5)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    pre = graft.ImagePreprocess(size=16, resize=18, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    spec = {"images": "float32[batch,3,16,16]"}
    root = tmp_path_factory.mktemp("onnx") / "cnn"
    graft.save(model, root, name="tiny-cnn", version="1.0.0",
               signatures={"classify": graft.Signature("forward", inputs=spec, outputs=["logits"],
                                                       example_inputs=(images,), preprocess=pre),
                           "features": graft.Signature("features", inputs=spec,
                                                       outputs=["features"],
                                                       example_inputs=(images,),
                                                       preprocess=pre)},
               assets={"labels.txt": "a\nb\nc\nd\n"})
    return root


@pytest.fixture(scope="module")
def cnn_onnx(cnn_module, tmp_path_factory):
    """The classify signature exported once for the tests that only read it."""
    return export_onnx(str(cnn_module), tmp_path_factory.mktemp("out") / "cnn.onnx",
                       signature="classify")


def test_export_runs_any_batch_and_writes_preprocessing(cnn_module, cnn_onnx):
    out = cnn_onnx.path
    assert cnn_onnx.max_abs_diff <= 1e-4 and cnn_onnx.checked_batches == (4, 1, 3)
    module = graft.load(str(cnn_module))
    session = onnx_session(out)
    assert [i.name for i in session.get_inputs()] == ["images"]
    for batch in (1, 5, 9):
        x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
        (got,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            want = module.call("classify", x)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)
    config = json.loads(out.with_suffix(".json").read_text())
    assert config["format"] == "graft.onnx/1"
    assert config["signature"] == "classify"
    assert config["module"]["digest"] == module.digest
    assert config["inputs"] == [{"name": "images", "spec": "float32[batch,3,16,16]"}]
    assert config["preprocess"] == {"kind": "image", "size": 16, "resize": 18,
                                    "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.4],
                                    "interpolation": "bilinear"}
    assert config["labels"] == ["a", "b", "c", "d"]
    assert config["parity"]["max_abs_diff"] == cnn_onnx.max_abs_diff


def test_cli_prints_the_parity_check(cnn_module, tmp_path, capsys):
    out = tmp_path / "features.onnx"
    assert main(["export", "onnx", str(cnn_module), "--signature", "features", "-o",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parity: ONNX Runtime vs PyTorch" in printed and "max abs difference" in printed
    assert out.is_file() and out.with_suffix(".json").is_file()
    # Exporting over existing files needs --force.
    assert main(["export", "onnx", str(cnn_module), "-s", "features", "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("graft export: error:") and "already exists" in err
    assert len(err.splitlines()) == 1


def test_parity_failure_refuses_and_writes_nothing(cnn_module, tmp_path, monkeypatch, capsys):
    # ONNX Runtime is made to answer for another model: the check must catch it.
    real = graft_onnx._max_diff

    def skewed(session, wrapper, batch):
        real(session, wrapper, batch)
        return 3e-4

    monkeypatch.setattr(graft_onnx, "_max_diff", skewed)
    out = tmp_path / "out" / "cnn.onnx"
    with pytest.raises(ExportError, match="differs from PyTorch by up to 0.0003"):
        export_onnx(str(cnn_module), out)
    assert sorted(p.name for p in out.parent.iterdir()) == []
    assert main(["export", "onnx", str(cnn_module), "-o", str(out)]) == 1
    assert "the export is refused" in capsys.readouterr().err


def test_bad_requests_are_clear_errors(cnn_module, tmp_path):
    with pytest.raises(SignatureError, match="has no signature 'nope'"):
        export_onnx(str(cnn_module), tmp_path / "x.onnx", signature="nope")
    with pytest.raises(ExportError, match="must be a file ending in .onnx"):
        export_onnx(str(cnn_module), tmp_path / "x.txt")
    assert list(tmp_path.glob("x.*")) == []


# The tiny transformer's 32-row position table bounds `seq`; graft.save says so, rightly.
@pytest.mark.filterwarnings("ignore:graft.save. signature 'embed' takes 'seq'")
def test_text_signature_has_dynamic_batch_and_sequence(tiny_transformer, tmp_path):
    from tests.conftest import write_word_tokenizer

    ids, mask = token_batch(3, 7)
    tokenizer = write_word_tokenizer(tmp_path / "tokenizer.json")
    graft.save(tiny_transformer, tmp_path / "txt", name="tiny-text", version="1.0.0",
               signatures={"embed": graft.Signature(
                   "forward", inputs={"input_ids": "int64[batch,seq]",
                                      "attention_mask": "int64[batch,seq]"},
                   outputs=["embeddings"], example_inputs=(ids, mask),
                   preprocess=graft.TextPreprocess("assets/tokenizer.json", max_length=32))},
               assets={"tokenizer.json": tokenizer})
    out = tmp_path / "text.onnx"
    result = export_onnx(str(tmp_path / "txt"), out)
    assert result.max_abs_diff <= 1e-4
    module = graft.load(str(tmp_path / "txt"))
    session = onnx_session(out)
    for batch, seq in ((1, 3), (4, 11)):
        ids, mask = token_batch(batch, seq)
        (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            want = module.call("embed", ids, mask)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)
    config = json.loads(out.with_suffix(".json").read_text())
    assert config["preprocess"]["tokenizer"] == "text.tokenizer.json"
    assert (tmp_path / "text.tokenizer.json").read_bytes() == tokenizer.read_bytes()
