"""``graft export onnx``: one signature of a module as an ONNX model, checked against PyTorch.

The signature's eval program (the stored graph, run by Graft's own runtime over the module's
weights) is traced once more with ``torch.export``, with every named input dimension dynamic
(``batch``, ``seq``, within the bounds the module records), and converted by torch.onnx's
dynamo exporter. ONNX Runtime then runs the result on the module's reference inputs, and on a
batch of one and of three built from them, and every output must match PyTorch to
``tolerance`` (1e-4 by default): an export that does not reproduce the module is refused,
not written.

Beside ``model.onnx`` goes ``model.json``: which module and signature it is, the input and
output specs, the declarative preprocessing, the class labels when the module has them, and
the parity measured. A text signature's tokenizer is copied beside it as
``model.tokenizer.json``. Both are what the browser page needs to feed the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from graft import _fs
from graft._extras import require
from graft.errors import ExportError, SignatureError
from graft.format.spec import SignatureSpec

__all__ = ["ONNX_FORMAT", "OPSET", "OnnxExport", "TOLERANCE", "cli", "describe", "export_onnx",
           "onnx_session", "reference_inputs"]

#: The format tag of the JSON written beside an exported ``.onnx`` file.
ONNX_FORMAT = "graft.onnx/1"
#: The opset torch.onnx's dynamo exporter is asked for (ONNX Runtime Web runs it).
OPSET = 18
TOLERANCE = 1e-4


@dataclass(frozen=True)
class OnnxExport:
    """What ``export_onnx`` wrote and how closely ONNX Runtime reproduces PyTorch."""

    path: Path
    sidecar: Path
    signature: str
    max_abs_diff: float
    checked_batches: tuple[int, ...]
    config: dict[str, Any] = field(repr=False, default_factory=dict)
    #: With ``quantize``: how it was done and how far the result is from PyTorch.
    quantization: dict[str, Any] | None = None


class _SignatureFunction(nn.Module):
    """A signature as a plain ``forward(*inputs) -> tuple of outputs`` for ``torch.export``."""

    def __init__(self, module: Any, name: str) -> None:
        super().__init__()
        self.module = module
        self.name = name
        self.outputs = list(module.manifest.signatures[name].outputs)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.module.call(self.name, *inputs)
        if isinstance(out, torch.Tensor):
            return (out,)
        if isinstance(out, dict) and all(k in out for k in self.outputs):
            return tuple(out[k] for k in self.outputs)
        # Nested outputs (tuples, lists) are flattened in the order the spec names them.
        leaves = torch.utils._pytree.tree_leaves(out)
        if len(leaves) != len(self.outputs):
            raise ExportError(f"signature {self.name!r} returned {len(leaves)} tensors but "
                              f"declares outputs {self.outputs}")
        return tuple(leaves)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's notes (missing torchvision ops, deprecations) on the console."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def reference_inputs(module: Any, name: str) -> dict[str, torch.Tensor]:
    """The reference inputs a module stores for signature ``name``, by input name.

    Raises:
        ExportError: the module has no reference inputs for the signature.
    """
    from graft.runtime.load import read_safetensors

    rel = f"reference/{name}.safetensors"
    if rel not in module.manifest.files:
        raise ExportError(f"module {module.name} stores no reference inputs for signature "
                          f"{name!r}, so the export cannot be checked against PyTorch; "
                          "re-save the module with graft.save, which records them")
    ref = read_safetensors(module.file_path(rel))
    spec = module.manifest.signatures[name]
    inputs = {k: ref.get(f"input.{k}") for k in spec.inputs}
    missing = [k for k, v in inputs.items() if v is None]
    if missing:
        raise ExportError(f"{rel} of module {module.name} lacks inputs {missing}")
    return inputs  # type: ignore[return-value]


def _dynamic_shapes(spec: SignatureSpec) -> tuple[dict[int, Any], ...]:
    """One ``torch.export.Dim`` per named dimension, shared by every input that names it."""
    from torch.export import Dim

    dims: dict[str, Any] = {}
    shapes = []
    for tensor_spec in spec.inputs.values():
        axes = {}
        for axis, dim in enumerate(tensor_spec.shape):
            if isinstance(dim, str) and dim.isidentifier():
                if dim not in dims:
                    low, high = spec.dims.get(dim, (1, None))
                    # Export traces at sizes >= 2; the graph it records runs for 1 as well.
                    dims[dim] = Dim(dim, min=max(low, 1), max=high) if high else Dim(dim)
                axes[axis] = dims[dim]
        shapes.append(axes)
    return tuple(shapes)


def _batches(inputs: dict[str, torch.Tensor], spec: SignatureSpec) -> list[dict[str, torch.Tensor]]:
    """The reference batch, its first row alone, and three rows (dynamic batch both ways)."""
    batch_axes = {k: [a for a, d in enumerate(s.shape) if d == "batch"]
                  for k, s in spec.inputs.items()}
    if not all(axes == [0] for axes in batch_axes.values()):
        return [inputs]
    first = {k: v[:1] for k, v in inputs.items()}
    three = {k: torch.cat([v, v[:1]])[:3] if v.shape[0] < 3 else v[:3]
             for k, v in inputs.items()}
    return [inputs, first, three]


def onnx_session(path: str | os.PathLike[str], *, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session over ``path`` (extra ``onnx``)."""
    ort = require("onnxruntime", "onnx", "Running an ONNX model")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _max_diff(session: Any, wrapper: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        expected = wrapper(*batch.values())
    feeds = {k: v.numpy() for k, v in batch.items()}
    got = session.run(None, feeds)
    worst = 0.0
    for name, want, have in zip(wrapper.outputs, expected, got):
        if tuple(have.shape) != tuple(want.shape):
            raise ExportError(f"ONNX output {name!r} has shape {tuple(have.shape)}, PyTorch "
                              f"{tuple(want.shape)}; the exported graph is wrong for this "
                              "batch size")
        diff = np.abs(have.astype(np.float64) - want.double().numpy())
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst


def _labels(module: Any) -> list[str] | None:
    try:
        path = module.asset_path("labels.txt")
    except FileNotFoundError:
        return None
    return path.read_text(encoding="utf-8").splitlines()


def export_onnx(handle: str | os.PathLike[str] | Any, output: str | os.PathLike[str], *,
                signature: str | None = None, tolerance: float = TOLERANCE,
                overwrite: bool = False, quantize: str | None = None,
                min_cosine: float | None = None) -> OnnxExport:
    """Export one signature of a module as ONNX, with its preprocessing beside it as JSON.

    Args:
        handle: A handle (``efficientnet-lite0``, a directory) or a loaded ``graft.Module``.
        output: The ``.onnx`` path to write; ``<stem>.json`` is written beside it.
        signature: The signature to export (default: the module's default signature).
        tolerance: The largest absolute difference from PyTorch that ONNX Runtime may show
            on the reference inputs.
        overwrite: Replace existing files at ``output``.
        quantize: ``"int8"``: write the model with int8 MatMul weights
            (``graft.export.quantize``), after the float graph passed the parity check.
        min_cosine: With ``quantize``: the least cosine similarity to PyTorch each output
            row must keep (default ``quantize.MIN_COSINE``).

    Returns:
        Where the files went, and the parity measured.

    Raises:
        ExportError: the signature cannot be exported, or ONNX Runtime disagrees with PyTorch
            by more than ``tolerance``; nothing is written then.
        ExtraNotInstalled: ``onnx``, ``onnxscript`` or ``onnxruntime`` is missing.
    """
    import graft
    from graft.runtime.module import Module

    from graft.export.quantize import MIN_COSINE, QUANTIZE, quantize_int8

    for package in ("onnx", "onnxscript", "onnxruntime"):
        require(package, "onnx", "ONNX export")
    if quantize is not None and quantize not in QUANTIZE:
        raise ExportError(f"--quantize {quantize}: Graft quantizes to {', '.join(QUANTIZE)}")
    if min_cosine is not None and (quantize is None or not 0 < min_cosine <= 1):
        raise ExportError("--min-cosine goes with --quantize, and is a number in (0, 1]")
    module = handle if isinstance(handle, Module) else graft.load(handle, trainable=False)
    module.eval()
    name = signature or module.default_signature
    spec = module.manifest.signatures.get(name)
    if spec is None:
        raise SignatureError(f"module {module.name} has no signature {name!r}; it has "
                             f"{sorted(module.manifest.signatures)}")
    path = Path(output).expanduser()
    if path.suffix != ".onnx":
        raise ExportError(f"-o {output}: the output must be a file ending in .onnx")
    sidecar = path.with_suffix(".json")
    tokenizer = getattr(spec.preprocess, "tokenizer", None)
    tokenizer_out = path.with_name(path.stem + ".tokenizer.json") if tokenizer else None
    if not overwrite:
        for target in (path, sidecar, tokenizer_out):
            if target is not None and target.exists():
                raise ExportError(f"{target} already exists; remove it or choose another -o")
    path.parent.mkdir(parents=True, exist_ok=True)

    wrapper = _SignatureFunction(module, name).eval()
    inputs = reference_inputs(module, name)
    examples = tuple(inputs.values())
    with tempfile.TemporaryDirectory(prefix=".graft-onnx-", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        try:
            with torch.no_grad(), _quiet():
                ep = torch.export.export(wrapper, examples,
                                         dynamic_shapes=(_dynamic_shapes(spec),),
                                         strict=False)
                program = torch.onnx.export(ep, examples, dynamo=True, opset_version=OPSET,
                                            input_names=list(spec.inputs),
                                            output_names=list(spec.outputs), verbose=False,
                                            optimize=True)
            program.save(str(staged))
        except ExportError:
            raise
        except Exception as exc:  # torch raises many types here; all mean "cannot export"
            raise ExportError(f"signature {name!r} of {module.name} cannot be exported to "
                              f"ONNX: {type(exc).__name__}: {exc}"[:2000]) from exc
        session = onnx_session(staged)
        batches = _batches(inputs, spec)
        worst = 0.0
        for batch in batches:
            worst = max(worst, _max_diff(session, wrapper, batch))
        if not worst <= tolerance:
            raise ExportError(f"ONNX Runtime differs from PyTorch by up to {worst:.3g} on the "
                              f"reference inputs of {module.name}:{name} (tolerance "
                              f"{tolerance:g}); the export is refused")
        del session
        labels = _labels(module)
        quantization = None
        if quantize is not None:
            quantized = Path(tmp) / f".quantized-{path.name}"
            quantization = quantize_int8(staged, quantized, onnx_session, wrapper, batches,
                                         classes=len(labels) if labels else None,
                                         min_cosine=min_cosine or MIN_COSINE)
            os.replace(quantized, staged)
        sizes = tuple(next(iter(b.values())).shape[0] for b in batches)
        config: dict[str, Any] = {
            "format": ONNX_FORMAT,
            "module": {"name": module.name, "version": module.version,
                       "digest": module.digest},
            "signature": name,
            "description": spec.description,
            "inputs": [{"name": k, "spec": str(v)} for k, v in spec.inputs.items()],
            "outputs": [{"name": k, "spec": str(v)} for k, v in spec.outputs.items()],
            "dims": {k: {"min": lo, "max": hi} for k, (lo, hi) in spec.dims.items()},
            "preprocess": spec.preprocess.to_json() if spec.preprocess else None,
            "labels": labels,
            "opset": OPSET,
            "parity": {"max_abs_diff": worst, "tolerance": tolerance,
                       "batches": list(sizes)},
            "quantization": quantization,
        }
        if tokenizer_out is not None:
            config["preprocess"]["tokenizer"] = tokenizer_out.name
            shutil.copyfile(module.file_path(tokenizer),
                            Path(tmp) / tokenizer_out.name)
        _fs.fsync_tree(tmp)
        # The model (and any external-data file of one over 2 GB) first, the JSON last: a
        # reader that finds the JSON finds the model.
        for staged_file in sorted(Path(tmp).iterdir()):
            os.replace(staged_file, path.parent / staged_file.name)
        _fs.atomic_write(sidecar, json.dumps(config, indent=1) + "\n")
    return OnnxExport(path, sidecar, name, worst, sizes, config, quantization)


def describe(result: OnnxExport) -> str:
    """The lines ``graft export onnx`` prints."""
    size = result.path.stat().st_size / 2**20
    batches = ", ".join(map(str, result.checked_batches))
    lines = (f"wrote {result.path} ({size:.1f} MB) and {result.sidecar.name}\n"
             f"parity: ONNX Runtime vs PyTorch on the reference inputs (batches {batches}): "
             f"max abs difference {result.max_abs_diff:.2e} (tolerance "
             f"{result.config['parity']['tolerance']:g}) ok")
    q = result.quantization
    if q:
        lines += (f" (the float graph)\nint8: {q['matmuls']} MatMul weights and "
                  f"{q['embedding_tables']} embedding tables quantized; vs "
                  f"PyTorch: max abs difference {q['max_abs_diff']:.2e}, least cosine "
                  f"similarity {q['min_cosine']:.4f} (at least {q['required_cosine']:g}) ok")
    return lines


def cli(args: Any) -> None:
    """``graft export onnx HANDLE [--signature S] -o FILE [--force] [--quantize int8]``."""
    print(describe(export_onnx(args.handle, args.output, signature=args.signature,
                               overwrite=args.force, quantize=args.quantize,
                               min_cosine=args.min_cosine)))
