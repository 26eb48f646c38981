"""`graft export onnx --quantize int8`: the MatMul weights become int8, the result is measured
against PyTorch and refused when it strays too far, and nothing is half-written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import graft
from graft.cli import main
from graft.errors import ExportError
from graft.export.onnx import describe, export_onnx, onnx_session
from tests.conftest import token_batch

pytestmark = pytest.mark.filterwarnings("ignore:graft.save. signature 'embed' takes 'seq'")


@pytest.fixture
def text_module(tiny_transformer, tmp_path):
    ids, mask = token_batch(3, 7)
    graft.save(tiny_transformer, tmp_path / "txt", name="tiny-text", version="1.0.0",
               signatures={"embed": graft.Signature(
                   "forward", inputs={"input_ids": "int64[batch,seq]",
                                      "attention_mask": "int64[batch,seq]"},
                   outputs=["embeddings"], example_inputs=(ids, mask))})
    return tmp_path / "txt"


def test_int8_weights_run_close_to_pytorch(text_module, tmp_path):
    import onnx

    out = tmp_path / "q" / "text.onnx"
    result = export_onnx(str(text_module), out, quantize="int8")
    float_out = export_onnx(str(text_module), tmp_path / "f" / "text.onnx")
    graph = onnx.load(str(out)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("MatMulInteger") == result.quantization["matmuls"] > 0
    float_ops = [node.op_type for node in onnx.load(str(float_out.path)).graph.node]
    # every product over a weight (MatMul, and Gemm: a linear layer) was replaced; the
    # products of two activations stay float
    products = float_ops.count("MatMul") + float_ops.count("Gemm")
    assert products - ops.count("MatMul") == result.quantization["matmuls"]
    int8 = [t for t in graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8) == result.quantization["matmuls"]  # one int8 weight matrix per product
    # in 7 bits, so that CPUs without VNNI (AVX2 only), whose uint8 x int8 products sum in
    # pairs into 16 bits, cannot overflow (255 * 64 * 2 < 2**15)
    assert max(int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int32)).max())
               for t in int8) <= 64
    # and the token embedding table, in uint8
    tables = [t for t in graph.initializer
              if t.data_type == onnx.TensorProto.UINT8 and list(t.dims) == [50, 16]]
    assert len(tables) == result.quantization["embedding_tables"] == 1
    module = graft.load(str(text_module))
    quantized, plain = onnx_session(out), onnx_session(float_out.path)
    for batch, seq in ((1, 5), (4, 11)):
        ids, mask = token_batch(batch, seq)
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        (got,) = quantized.run(None, feeds)
        (exact,) = plain.run(None, feeds)
        with torch.no_grad():
            want = module.call("embed", ids, mask).numpy()
        cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cosine.min() >= 0.98
        assert np.abs(got - want).max() > 1e-5  # it really is another model
        np.testing.assert_allclose(exact, want, atol=1e-5)
    config = json.loads(out.with_suffix(".json").read_text())
    assert config["quantization"] == result.quantization
    assert config["quantization"]["weights"] == "int8"
    assert 0.98 <= result.quantization["min_cosine"] < 1.0
    assert json.loads(float_out.sidecar.read_text())["quantization"] is None
    assert "int8: " in describe(result) and "least cosine similarity" in describe(result)
    assert out.stat().st_size < float_out.path.stat().st_size


def test_too_far_from_pytorch_is_refused_and_writes_nothing(text_module, tmp_path):
    out = tmp_path / "out" / "text.onnx"
    with pytest.raises(ExportError, match=r"keeps only a cosine similarity of 0\.9"):
        export_onnx(str(text_module), out, quantize="int8", min_cosine=1.0)
    assert list(out.parent.iterdir()) == []


def test_a_signature_without_matmuls_has_nothing_to_quantize(tmp_path):
    from tests.conftest import TinyCNN

    torch.manual_seed(0)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    graft.save(TinyCNN(), tmp_path / "cnn", name="tiny-cnn", version="1.0.0",
               signatures={"features": graft.Signature(
                   "features", inputs={"images": "float32[batch,3,16,16]"},
                   outputs=["features"], example_inputs=(images,))})
    out = tmp_path / "out" / "cnn.onnx"
    with pytest.raises(ExportError, match="found no MatMul over constant weights"):
        export_onnx(str(tmp_path / "cnn"), out, quantize="int8")
    assert list(out.parent.iterdir()) == []


def test_cli_quantizes_and_refuses_bad_options(text_module, tmp_path, capsys):
    out = tmp_path / "text.onnx"
    assert main(["export", "onnx", str(text_module), "-o", str(out), "--quantize",
                 "int8"]) == 0
    printed = capsys.readouterr().out
    assert "(the float graph)" in printed and "embedding tables quantized" in printed
    assert main(["export", "onnx", str(text_module), "-o", str(tmp_path / "x.onnx"),
                 "--min-cosine", "0.9"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--min-cosine goes with --quantize" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(ExportError, match="quantizes to int8"):
        export_onnx(str(text_module), tmp_path / "y.onnx", quantize="int4")
