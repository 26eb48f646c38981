"""``graft import-head``: a head trained in the browser page becomes a child module.

The page (``graft export web``) trains a softmax head on a backbone's feature signature and
downloads it as ``head.safetensors`` (``weight`` float32 (C, D), ``bias`` float32 (C), the
classes and the backbone in the header's metadata) or as ``head.json`` (the same fields, the
tensors as nested lists). Importing it saves ``logits = head(backbone.<signature>(x))`` as a
module with one ``classify`` signature, the backbone's preprocessing, ``labels.txt``, and the
backbone as its parent: its backbone tensors are the parent's tensors, byte for byte, so a
tensor-addressed store keeps them once.

The file is untrusted input: it is size-limited, parsed without unpickling (the safetensors
reader, Graft's strict JSON reader), and every field is checked before anything is built.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graft.errors import ExportError, FormatError

__all__ = ["HEAD_FORMAT", "Head", "HeadOnBackbone", "MAX_BYTES", "cli", "import_head", "read_head"]

HEAD_FORMAT = "graft.head/1"
MAX_BYTES = 256 << 20
_MAX_CLASSES = 10_000
_MAX_LABEL = 200


@dataclass(frozen=True)
class Head:
    """A linear softmax head read from a file the page wrote.

    Args:
        weight: float32 (C, D).
        bias: float32 (C,).
        classes: The C class names, in label order.
        signature: The backbone signature it was trained on (None: not recorded).
        parent_digest: The backbone's digest (None: not recorded).
        metadata: Everything else the file recorded (steps, learning rate, loss, ...).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    classes: tuple[str, ...]
    signature: str | None = None
    parent_digest: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _refuse(path: Path, why: str) -> FormatError:
    return FormatError(f"{path.name} is not a head the page wrote: {why}; download it again "
                       "from the page (Download the head)")


def _json(data: bytes, what: str) -> Any:
    from graft.format.jsonio import loads

    return loads(data, what=what, max_bytes=MAX_BYTES)


def _read_safetensors(path: Path, data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    if len(data) < 8:
        raise _refuse(path, "it is shorter than a safetensors header")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise _refuse(path, f"its header claims {size} bytes, the file has {len(data) - 8}")
    header = _json(data[8:8 + size], f"the header of {path.name}")
    if not isinstance(header, dict):
        raise _refuse(path, "its safetensors header is not an object")
    raw = header.get("__metadata__") or {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise _refuse(path, "its metadata is not a map of strings")
    metadata: dict[str, Any] = {}
    for key, value in raw.items():
        # The page writes strings as they are and everything else as JSON text.
        try:
            metadata[key] = _json(value.encode("utf-8"), f"metadata {key!r}")
        except FormatError:
            metadata[key] = value
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as exc:
        raise _refuse(path, f"its tensors do not read ({exc})") from None
    return tensors, metadata


def _read_json(path: Path, data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    doc = _json(data, path.name)
    if not isinstance(doc, dict):
        raise _refuse(path, "it is JSON but not an object")
    tensors = {}
    for key in ("weight", "bias"):
        value = doc.pop(key, None)
        if value is None:
            raise _refuse(path, f"it has no {key!r}")
        try:
            tensors[key] = torch.tensor(value, dtype=torch.float64).to(torch.float32)
        except (TypeError, ValueError):
            raise _refuse(path, f"{key!r} is not a rectangular array of numbers") from None
    return tensors, doc


def read_head(path: str | os.PathLike[str]) -> Head:
    """Read and check ``head.safetensors`` or ``head.json``.

    Raises:
        FormatError: the file is not a well-formed head (what is wrong is named).
    """
    path = Path(path).expanduser()
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FormatError(f"head file {path} does not exist") from None
    if size > MAX_BYTES:
        raise _refuse(path, f"it is {size} bytes, over the {MAX_BYTES} limit")
    data = path.read_bytes()
    if data.lstrip()[:1] == b"{":
        tensors, metadata = _read_json(path, data)
    else:
        tensors, metadata = _read_safetensors(path, data)
    if set(tensors) != {"weight", "bias"}:
        raise _refuse(path, f"it holds tensors {sorted(tensors)}; a head holds 'weight' and "
                      "'bias'")
    weight, bias = tensors["weight"], tensors["bias"]
    if weight.dtype != torch.float32 or bias.dtype != torch.float32:
        raise _refuse(path, f"its tensors are {weight.dtype} and {bias.dtype}, not float32")
    if weight.dim() != 2 or bias.shape != (weight.shape[0],) or weight.shape[0] < 2:
        raise _refuse(path, f"weight is {list(weight.shape)} and bias {list(bias.shape)}; "
                      "expected (C, D) and (C,) with at least two classes")
    if weight.shape[0] > _MAX_CLASSES:
        raise _refuse(path, f"it has {weight.shape[0]} classes, over {_MAX_CLASSES}")
    if not (bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bias).all())):
        raise _refuse(path, "its weights hold NaN or infinite values")
    fmt = metadata.pop("format", HEAD_FORMAT)
    if fmt != HEAD_FORMAT:
        raise _refuse(path, f"its format is {fmt!r}, not {HEAD_FORMAT!r}")
    classes = metadata.pop("classes", None)
    if (not isinstance(classes, list) or len(classes) != weight.shape[0]
            or not all(isinstance(c, str) for c in classes)):
        raise _refuse(path, f"'classes' must list {weight.shape[0]} names, got {classes!r}"[:300])
    for name in classes:
        if not name.strip() or len(name) > _MAX_LABEL or any(ch in name for ch in "\r\n\0"):
            raise _refuse(path, f"class name {name!r} must be 1 to {_MAX_LABEL} characters on "
                          "one line"[:300])
    if len(set(classes)) != len(classes):
        raise _refuse(path, f"class names repeat: {classes}"[:300])
    signature = metadata.pop("signature", None)
    digest = metadata.pop("parent_digest", None)
    for key, value in (("signature", signature), ("parent_digest", digest)):
        if value is not None and not isinstance(value, str):
            raise _refuse(path, f"{key!r} must be a string, got {value!r}"[:300])
    return Head(weight.contiguous(), bias.contiguous(), tuple(classes), signature, digest,
                {k: v for k, v in metadata.items() if _plain(v)})


def _plain(value: Any) -> bool:
    """Metadata worth carrying into the child's manifest: short plain values."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, str):
        return len(value) <= 500
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    return False


class HeadOnBackbone(nn.Module):
    """``logits = head(backbone.<signature>(inputs))``: the child module's ``classify``."""

    def __init__(self, backbone: Any, signature: str, head: Head) -> None:
        super().__init__()
        self.backbone = backbone
        self.signature = signature
        classes, dim = head.weight.shape
        self.head = nn.Linear(dim, classes)
        with torch.no_grad():
            self.head.weight.copy_(head.weight)
            self.head.bias.copy_(head.bias)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        features = self.backbone.call(self.signature, *inputs)  # (B, D)
        return self.head(features)  # (B, C)


def import_head(file: str | os.PathLike[str], *, parent: str | os.PathLike[str] | Any,
                out: str | os.PathLike[str], store: Any = None) -> Any:
    """Save a head from the page as a child module of ``parent``.

    Args:
        file: ``head.safetensors`` or ``head.json``.
        parent: The backbone's handle (or a loaded ``graft.Module``); it must be the module
            the head was trained on when the file records that.
        out: Where the child goes: ``name@version`` in the store, or a directory.

    Returns:
        The ``SavedModule``.

    Raises:
        FormatError: the file is not a well-formed head.
        ExportError: the head does not fit the backbone (another module, another width).
    """
    import graft
    from graft.export.onnx import reference_inputs
    from graft.runtime.module import Module

    head = read_head(file)
    backbone = parent if isinstance(parent, Module) else graft.load(parent, trainable=False)
    if head.parent_digest is not None and head.parent_digest != backbone.digest:
        recorded = head.metadata.get("parent", head.parent_digest)
        raise ExportError(f"the head was trained on {recorded} ({head.parent_digest}), not on "
                          f"{backbone.name}@{backbone.version} ({backbone.digest}); pass that "
                          "module as --parent")
    signature = head.signature or ("features" if "features" in backbone.manifest.signatures
                                   else backbone.default_signature)
    spec = backbone.manifest.signatures.get(signature)
    if spec is None:
        raise ExportError(f"the head was trained on signature {signature!r}, which "
                          f"{backbone.name} does not have ({sorted(backbone.manifest.signatures)})")
    outputs = list(spec.outputs.values())
    dim = head.weight.shape[1]
    if len(outputs) != 1 or tuple(outputs[0].shape[1:]) != (dim,):
        raise ExportError(f"the head takes {dim}-d features, but {backbone.name}:{signature} "
                          f"outputs {', '.join(map(str, outputs))}")
    model = HeadOnBackbone(backbone.eval(), signature, head).eval()
    assets: dict[str, Any] = {"labels.txt": "\n".join(head.classes) + "\n"}
    tokenizer = getattr(spec.preprocess, "tokenizer", None)
    if tokenizer is not None:
        assets[tokenizer.removeprefix("assets/")] = backbone.asset_path(
            tokenizer.removeprefix("assets/"))
    examples = tuple(reference_inputs(backbone, signature).values())
    return graft.save(
        model, out, store=store,
        description=(f"{len(head.classes)}-class classifier ({', '.join(head.classes)})"[:300]
                     + f": {backbone.name}:{signature} and a softmax head trained in the "
                     "browser page"),
        license=backbone.manifest.license,
        signatures={"classify": graft.Signature(
            "forward", inputs=dict(spec.inputs), outputs=["logits"], example_inputs=examples,
            preprocess=spec.preprocess,
            description=f"logits over {len(head.classes)} classes (labels.txt)")},
        assets=assets,
        metadata={"head": {"trained_in": "browser", "signature": signature, **head.metadata}},
    )


def cli(args: Any) -> None:
    """``graft import-head FILE --parent HANDLE --out NAME@VERSION``."""
    saved = import_head(Path(args.file), parent=args.parent, out=args.out)
    print(f"imported {saved.handle or saved.path} {saved.digest} (parent "
          f"{args.parent}); run it with `graft run {saved.handle or saved.path} IMAGE`")
