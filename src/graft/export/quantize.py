"""Weight quantization of an exported ONNX model (``graft export onnx --quantize int8``).

``int8`` is ONNX Runtime's dynamic quantization of every ``MatMul`` whose weights are
constants (a linear layer's ``Gemm`` is made one first) and of every embedding table (a
``Gather`` from constants): product weights are stored as int8 with one scale per output
channel, tables as uint8 with one scale each, and each call quantizes a product's
activations to uint8 on the fly (``DynamicQuantizeLinear``, ``MatMulInteger``,
``DequantizeLinear``: standard ONNX operators, so ONNX Runtime Web runs them too). The model
is about a quarter of the size and, where matrix products over the weights dominate (a
transformer at batch 1, which reads every weight once per call), several times faster.

It is lossy, so it cannot pass the 1e-4 parity check of the float export. The float graph is
checked first, as always; the quantized one is then measured against PyTorch on the same
reference inputs, and refused unless every output row keeps a cosine similarity of at least
``min_cosine`` to PyTorch's (and, for a classifier, the same top class). Convolutions are
left in float: ONNX Runtime's integer convolution is slower than its float one on CPU.

Weights use 7 of the 8 bits (``reduce_range``). On an x86 CPU without VNNI instructions (AVX2
only), ONNX Runtime multiplies uint8 activations by int8 weights in pairs summed into 16 bits,
which overflows with full-range weights: the same file lost cosine similarity only on such
CPUs (0.972 against 0.9999 for the test model). Seven bits cannot overflow there, so a model
measured on one machine behaves the same on every other, the browser's included.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from graft._extras import require
from graft.errors import ExportError

__all__ = ["MIN_COSINE", "QUANTIZE", "quantize_int8"]

#: The quantizations ``--quantize`` offers.
QUANTIZE = ("int8",)
#: The least cosine similarity to PyTorch an output row may keep after quantization.
MIN_COSINE = 0.98


def quantize_int8(source: Path, target: Path, session_for: Any, wrapper: torch.nn.Module,
                  batches: Iterable[dict[str, torch.Tensor]], *, classes: int | None = None,
                  min_cosine: float = MIN_COSINE) -> dict[str, Any]:
    """Write ``source`` (a float ONNX model) to ``target`` with int8 MatMul weights, and
    measure it against ``wrapper`` (the signature in PyTorch) on ``batches``.

    Args:
        session_for: ``path -> ONNX Runtime session``.
        classes: How many labels the module has: an output of that width is a classifier's
            scores, whose top class must not change.
        min_cosine: Refuse the result if an output row's cosine similarity to PyTorch's
            falls below this.

    Returns:
        What ``model.json`` records under ``quantization``.

    Raises:
        ExportError: the graph has no MatMul over constant weights, or the quantized model
            strays further from PyTorch than ``min_cosine`` allows.
    """
    onnx = require("onnx", "onnx", "ONNX quantization")
    quantization = require("onnxruntime.quantization", "onnx", "ONNX quantization")
    with _quiet():
        quantization.quantize_dynamic(str(source), str(target),
                                      op_types_to_quantize=["MatMul", "Gather"],
                                      per_channel=True, reduce_range=True,
                                      weight_type=quantization.QuantType.QInt8)
    graph = onnx.load(str(target), load_external_data=False).graph
    matmuls = sum(1 for node in graph.node if node.op_type == "MatMulInteger")
    eight_bit = {t.name for t in graph.initializer
                 if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    tables = sum(1 for node in graph.node
                 if node.op_type == "Gather" and node.input[0] in eight_bit)
    if matmuls == 0:
        target.unlink(missing_ok=True)
        raise ExportError("--quantize int8 found no MatMul over constant weights in this "
                          "signature (no linear layers; convolutions stay in float): "
                          "the result would be the float model; export without --quantize")
    session = session_for(target)
    worst_diff, worst_cos, top1 = 0.0, 1.0, True
    for batch in batches:
        with torch.no_grad():
            expected = wrapper(*batch.values())
        got = session.run(None, {k: v.numpy() for k, v in batch.items()})
        for want, have in zip(expected, got):
            want = want.double().numpy()
            have = have.astype(np.float64)
            worst_diff = max(worst_diff, float(np.abs(have - want).max()) if want.size else 0.0)
            worst_cos = min(worst_cos, _least_cosine(want, have))
            if classes and want.ndim == 2 and want.shape[1] == classes:
                top1 = top1 and bool((want.argmax(1) == have.argmax(1)).all())
    del session
    if not (worst_cos >= min_cosine and top1):
        target.unlink(missing_ok=True)
        what = f"a cosine similarity of {worst_cos:.6f}" + ("" if top1 else
                                                            " and another top class")
        raise ExportError(f"the int8 model keeps only {what} to PyTorch on the reference "
                          f"inputs (at least {min_cosine:g} is required); export it in float, "
                          "or lower --min-cosine if that is enough for your use")
    return {"weights": "int8",
            "method": ("dynamic; MatMul weights int8 (7-bit range) per output channel, "
                       "embedding tables uint8"),
            "matmuls": matmuls, "embedding_tables": tables, "max_abs_diff": worst_diff,
            "min_cosine": worst_cos, "required_cosine": min_cosine}


def _least_cosine(want: np.ndarray, have: np.ndarray) -> float:
    """The smallest cosine similarity between matching rows (first axis) of two outputs."""
    if want.size == 0:
        return 1.0
    a = want.reshape(want.shape[0], -1) if want.ndim else want.reshape(1, 1)
    b = have.reshape(a.shape)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(axis=1)
    # two zero rows agree; one zero row against another does not
    cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0),
                   np.where(np.abs(a).sum(axis=1) + np.abs(b).sum(axis=1) == 0, 1.0, 0.0))
    return float(cos.min())


@contextlib.contextmanager
def _quiet() -> Any:
    """The quantizer logs advice (pre-processing, shape inference) on the root logger."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
