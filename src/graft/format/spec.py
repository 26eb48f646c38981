"""Typed tensor specs and signature specs: what a module's functions take and return.

A tensor spec is written ``dtype[dim,dim,...]``, for example ``float32[batch,3,224,224]``.
A dimension is either a fixed size (``3``) or a name (``batch``, ``seq``): a named dimension
may take any size, but every input of one call must agree on it.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

from graft.errors import FormatError, SignatureError
from graft.format.fields import (
    check_relative_path,
    expect_identifier,
    expect_int,
    expect_list,
    expect_object,
    expect_string,
)
from graft.format.limits import (
    MAX_DIM_SIZE,
    MAX_IMAGE_SIDE,
    MAX_NAME_CHARS,
    MAX_SIGNATURE_TENSORS,
    MAX_TENSOR_ELEMENTS,
    MAX_TENSOR_RANK,
    MAX_TEXT_MAX_LENGTH,
)
from graft.format.structure import OUTPUT_NAME, check_structure

__all__ = [
    "DTYPES",
    "ImagePreprocess",
    "SignatureSpec",
    "TensorSpec",
    "TextPreprocess",
    "VARIANTS",
    "dtype_name",
    "dtype_name_or_str",
    "preprocess_from_json",
]

#: The dtypes a spec may name. Each is also the name of the torch dtype (``torch.float32``).
DTYPES: frozenset[str] = frozenset({
    "float64", "float32", "float16", "bfloat16",
    "int64", "int32", "int16", "int8", "uint8", "bool",
})
#: The program variants a signature may have (see docs/format.md).
VARIANTS = ("eval", "train", "train_frozen_bn")
#: Interpolations image preprocessing may name.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
# A derived dimension (an expression of named ones, e.g. "2*seq") is recorded but not checked.
# It holds a letter (a bare number would read back as a fixed size) and no space.
_DERIVED = re.compile(r"[A-Za-z0-9_+\-*/()]*[A-Za-z_][A-Za-z0-9_+\-*/()]*", re.ASCII)
_SPEC = re.compile(r" *([a-z0-9]+) *\[([^\[\]]*)\] *", re.ASCII)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)


def dtype_name(dtype: Any) -> str:
    """The spec name of a torch dtype (``torch.float32`` -> ``"float32"``)."""
    name = dtype_name_or_str(dtype)
    if name not in DTYPES:
        raise FormatError(f"dtype {dtype} is not supported in a module signature; "
                          f"use one of {sorted(DTYPES)}")
    return name


@dataclass(frozen=True)
class TensorSpec:
    """The dtype and shape of one named input or output.

    Args:
        dtype: A name from ``DTYPES``.
        shape: One entry per dimension: an ``int`` for a fixed size, a ``str`` for a named
            (dynamic) dimension.
    """

    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise FormatError(f"tensor spec dtype {self.dtype!r:.80} is unknown; expected one "
                              f"of {sorted(DTYPES)}")
        if not isinstance(self.shape, (tuple, list)) or len(self.shape) > MAX_TENSOR_RANK:
            raise FormatError(f"tensor spec shape {self.shape!r:.80} must be a sequence of at "
                              f"most {MAX_TENSOR_RANK} dimensions")
        object.__setattr__(self, "shape", tuple(self.shape))
        elements = 1
        for dim in self.shape:
            if isinstance(dim, bool) or not isinstance(dim, (int, str)):
                raise FormatError(f"tensor spec has dimension {dim!r:.80}; expected an int "
                                  "size or a dimension name")
            if isinstance(dim, int):
                if not 0 <= dim <= MAX_DIM_SIZE:
                    raise FormatError(f"tensor spec {self} has dimension {dim}; a fixed size "
                                      f"must be between 0 and {MAX_DIM_SIZE}")
                elements *= dim
            # A derived dimension ("2*seq") is recorded but not checked; it holds a letter (a
            # bare number would read back as a fixed size) and no space or comma.
            elif len(dim) > MAX_NAME_CHARS or not (_NAME.fullmatch(dim)
                                                   or _DERIVED.fullmatch(dim)):
                raise FormatError(f"tensor spec dimension name {dim!r:.80} is not an identifier "
                                  "or an expression of identifiers")
        if elements > MAX_TENSOR_ELEMENTS:
            raise FormatError(f"tensor spec {self} has more than {MAX_TENSOR_ELEMENTS} "
                              "elements")

    @classmethod
    def parse(cls, text: str) -> TensorSpec:
        """Parse ``"float32[batch,3,224,224]"``; ``"float32[]"`` is a scalar."""
        match = _SPEC.fullmatch(text) if isinstance(text, str) and len(text) < 4096 else None
        if not match:
            raise FormatError(f"tensor spec {text!r:.80} is malformed; expected dtype[dims], "
                              "e.g. 'float32[batch,3,224,224]'")
        dims: list[int | str] = []
        body = match.group(2).strip(" ")
        for part in body.split(",") if body else []:
            part = part.strip(" ")
            if part.startswith("-") and _DIGITS.fullmatch(part[1:]):
                raise FormatError(f"tensor spec {text!r:.80} has a negative dimension {part}")
            if _DIGITS.fullmatch(part) and len(part) > 20:
                raise FormatError(f"tensor spec {text!r:.80} has a dimension of {len(part)} "
                                  "digits")
            dims.append(int(part) if _DIGITS.fullmatch(part) else part)
        return cls(match.group(1), tuple(dims))

    @classmethod
    def of(cls, spec: TensorSpec | str) -> TensorSpec:
        """Accept a spec or its string form."""
        return spec if isinstance(spec, TensorSpec) else cls.parse(spec)

    @property
    def torch_dtype(self) -> Any:
        """The ``torch.dtype`` (imports torch; the name was checked against ``DTYPES``)."""
        import torch

        return getattr(torch, self.dtype)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"

    def check(self, name: str, value: Any, bound: dict[str, int]) -> None:
        """Raise ``SignatureError`` unless ``value`` matches this spec.

        Args:
            name: The input's name, for the message.
            value: What the caller passed.
            bound: Sizes of named dimensions seen so far in this call; updated in place so that
                every input of one call agrees on ``batch``, ``seq``, ...
        """
        if not _is_tensor(value):
            raise SignatureError(f"input '{name}' expects a tensor {self}, got "
                                 f"{type(value).__name__}; pass a torch.Tensor")
        got = f"{dtype_name_or_str(value.dtype)}[{','.join(map(str, value.shape))}]"
        fixes = []
        if dtype_name_or_str(value.dtype) != self.dtype:
            fixes.append(f"convert with `.to(torch.{self.dtype})`")
        if value.dim() != len(self.shape):
            fixes.append(f"give it {len(self.shape)} dimensions, not {value.dim()}"
                         + (" (add the batch dimension with `.unsqueeze(0)`)"
                            if value.dim() + 1 == len(self.shape) else ""))
        else:
            for axis, (want, have) in enumerate(zip(self.shape, value.shape)):
                if isinstance(want, int) and want != have:
                    fixes.append(f"dimension {axis} must be {want}, not {have}")
                elif isinstance(want, str) and _NAME.fullmatch(want):
                    seen = bound.setdefault(want, have)
                    if seen != have:
                        fixes.append(f"dimension {axis} ('{want}') is {have} here but {seen} "
                                     "in an earlier input of the same call")
        if fixes:
            raise SignatureError(f"input '{name}' expects {self}, got {got}; "
                                 + "; ".join(fixes))

    def to_json(self) -> str:
        return str(self)

    @classmethod
    def from_json(cls, data: Any) -> TensorSpec:
        if not isinstance(data, str):
            raise FormatError(f"tensor spec must be a string like 'float32[batch,3]', "
                              f"got {data!r}")
        return cls.parse(data)


def dtype_name_or_str(dtype: Any) -> str:
    """``torch.float32`` -> ``"float32"``, for any dtype (spec or not)."""
    return str(dtype).removeprefix("torch.")


def _is_tensor(value: Any) -> bool:
    # Checked without importing torch: a module that holds tensors has imported it already.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


@dataclass(frozen=True)
class ImagePreprocess:
    """Declarative image preprocessing: PIL image or uint8 array -> normalised float tensor.

    Steps, in order: convert to RGB; resize the shorter side to ``resize``; centre-crop to
    ``size`` x ``size``; scale to [0, 1]; subtract ``mean`` and divide by ``std`` per channel;
    lay out as (3, H, W).
    """

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    kind: str = field(default="image", init=False)

    def __post_init__(self) -> None:
        expect_int(self.size, "image preprocessing size", low=1, high=MAX_IMAGE_SIDE)
        expect_int(self.resize, "image preprocessing resize", low=1, high=MAX_IMAGE_SIDE)
        if self.resize < self.size:
            raise FormatError(f"image preprocessing needs size <= resize (it crops the "
                              f"resized image), got size={self.size}, resize={self.resize}")
        for what in ("mean", "std"):
            values = getattr(self, what)
            if (not isinstance(values, (tuple, list)) or len(values) != 3
                    or not all(_real(v) for v in values)):
                raise FormatError(f"image preprocessing {what} must be three finite numbers, "
                                  f"one per RGB channel, got {values!r:.80}")
            object.__setattr__(self, what, tuple(float(v) for v in values))
        if min(self.std) <= 0:
            raise FormatError(f"image preprocessing std must be positive, got {self.std}")
        if not isinstance(self.interpolation, str) or self.interpolation not in INTERPOLATIONS:
            raise FormatError(f"image interpolation {self.interpolation!r:.80} is unknown; "
                              f"expected one of {INTERPOLATIONS}")

    def to_json(self) -> dict[str, Any]:
        return {"kind": "image", "size": self.size, "resize": self.resize,
                "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}


@dataclass(frozen=True)
class TextPreprocess:
    """Declarative text preprocessing: list of strings -> token ids and attention mask.

    ``tokenizer`` is the path of a ``tokenizer.json`` asset inside the module; strings are
    truncated to ``max_length`` tokens and padded to the longest in the batch.
    """

    tokenizer: str
    max_length: int
    kind: str = field(default="text", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.tokenizer, str) or not self.tokenizer.startswith("assets/"):
            raise FormatError(f"text preprocessing tokenizer {self.tokenizer!r:.80} must be a "
                              "path under assets/")
        check_relative_path(self.tokenizer)
        expect_int(self.max_length, "text preprocessing max_length", low=1,
                   high=MAX_TEXT_MAX_LENGTH)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "text", "tokenizer": self.tokenizer, "max_length": self.max_length}


Preprocess = ImagePreprocess | TextPreprocess


def preprocess_from_json(data: Mapping[str, Any] | None) -> Preprocess | None:
    """Build a preprocessing step from its manifest form."""
    if data is None:
        return None
    data = expect_object(data, "preprocess", required=("kind",),
                         optional=("size", "resize", "mean", "std", "interpolation",
                                   "tokenizer", "max_length"))
    if data["kind"] == "image":
        data = expect_object(data, "image preprocess",
                             required=("kind", "size", "resize", "mean", "std"),
                             optional=("interpolation",))
        return ImagePreprocess(data["size"], data["resize"], data["mean"], data["std"],
                               data.get("interpolation", "bilinear"))
    if data["kind"] == "text":
        data = expect_object(data, "text preprocess",
                             required=("kind", "tokenizer", "max_length"))
        return TextPreprocess(data["tokenizer"], data["max_length"])
    raise FormatError(f"preprocess kind {data['kind']!r:.80} is unknown; expected 'image' "
                      "or 'text'")


def _real(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclass(frozen=True)
class SignatureSpec:
    """One named function of a module.

    Args:
        inputs: Input name -> spec, in call order.
        outputs: Output name -> spec, in return order.
        programs: Variant (``"eval"``, ``"train"``) -> program path inside the module.
        preprocess: Optional declarative preprocessing of the first input.
        description: One line for people.
        dims: Bounds of named dimensions the program is valid for, e.g. ``{"seq": (1, 512)}``
            when a position table has 512 rows (``None``: unbounded above).
        structure: How the outputs nest in what a call returns (see ``format/structure.py``);
            ``None``: one output is returned bare, several as a dict by name.
    """

    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]
    programs: Mapping[str, str]
    preprocess: Preprocess | None = None
    description: str = ""
    dims: Mapping[str, tuple[int, int | None]] = field(default_factory=dict)
    structure: Any = None

    def __post_init__(self) -> None:
        for what in ("inputs", "outputs"):
            specs = getattr(self, what)
            if not isinstance(specs, Mapping) or len(specs) > MAX_SIGNATURE_TENSORS:
                raise FormatError(f"signature {what} must be a mapping of at most "
                                  f"{MAX_SIGNATURE_TENSORS} names to specs")
            for key in specs:
                if isinstance(key, str) and len(key) > MAX_NAME_CHARS:
                    raise FormatError(f"signature {what[:-1]} name {key[:40]!r}... is longer "
                                      f"than {MAX_NAME_CHARS} characters")
                # Outputs flattened from nested containers are dotted: hidden_states.0
                rule = _NAME if what == "inputs" else OUTPUT_NAME
                if not isinstance(key, str) or not rule.fullmatch(key):
                    raise FormatError(f"signature {what[:-1]} name {key!r} is not an "
                                      "identifier")
            object.__setattr__(self, what, {k: TensorSpec.of(v) for k, v in specs.items()})
        if not self.inputs or not self.outputs:
            raise FormatError("a signature needs at least one input and one output")
        if not isinstance(self.programs, Mapping) or "eval" not in self.programs:
            raise FormatError(f"a signature needs an 'eval' program, got {self.programs!r:.200}")
        for variant, rel in self.programs.items():
            if variant not in VARIANTS:
                raise FormatError(f"program variant {variant!r:.80} is unknown; expected one of "
                                  f"{VARIANTS}")
            check_relative_path(rel)
            if not (rel.startswith("programs/") and rel.endswith(".json")):
                raise FormatError(f"program {rel!r} must be a .json file under programs/")
        object.__setattr__(self, "programs", dict(self.programs))
        expect_string(self.description, "signature description")
        if not isinstance(self.dims, Mapping):
            raise FormatError(f"signature dims must be a mapping, got {self.dims!r:.80}")
        dims = {}
        for key, bounds in self.dims.items():
            expect_identifier(key, "bounded dimension")
            if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
                raise FormatError(f"bounds of dimension {key!r} must be (min, max), got "
                                  f"{bounds!r:.80}")
            low, high = bounds
            expect_int(low, f"dimension {key!r} min", low=0, high=MAX_DIM_SIZE)
            if high is not None:
                expect_int(high, f"dimension {key!r} max", low=low, high=MAX_DIM_SIZE)
            dims[key] = (low, high)
        object.__setattr__(self, "dims", dims)
        if isinstance(self.preprocess, TextPreprocess) and len(self.inputs) < 2:
            raise FormatError("text preprocessing feeds two inputs (token ids, attention mask); "
                              f"this signature has {list(self.inputs)}")
        if self.preprocess is not None and not isinstance(self.preprocess,
                                                          (ImagePreprocess, TextPreprocess)):
            raise FormatError(f"preprocess {self.preprocess!r:.80} is not image or text "
                              "preprocessing")
        if self.structure is not None:
            check_structure(self.structure, list(self.outputs))

    def check_dims(self, sizes: Mapping[str, int]) -> None:
        """Raise ``SignatureError`` if a named dimension is outside the program's bounds."""
        for key, size in sizes.items():
            low, high = self.dims.get(key, (0, None))
            if size < low or (high is not None and size > high):
                upper = "no limit" if high is None else high
                raise SignatureError(f"dimension '{key}' is {size}, but this signature takes "
                                     f"{low} to {upper}; "
                                     + (f"truncate the input to {high}" if high is not None
                                        and size > high else "pad the input"))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "inputs": [{"name": k, "spec": v.to_json()} for k, v in self.inputs.items()],
            "outputs": [{"name": k, "spec": v.to_json()} for k, v in self.outputs.items()],
            "programs": dict(self.programs),
            "description": self.description,
            "dims": {k: {"min": lo, "max": hi} for k, (lo, hi) in self.dims.items()},
        }
        if self.preprocess is not None:
            out["preprocess"] = self.preprocess.to_json()
        if self.structure is not None:
            out["structure"] = self.structure
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SignatureSpec:
        data = expect_object(data, "signature", required=("inputs", "outputs", "programs"),
                             optional=("preprocess", "description", "dims", "structure"))
        tensors: dict[str, dict[str, TensorSpec]] = {}
        for what in ("inputs", "outputs"):
            tensors[what] = {}
            for entry in expect_list(data[what], f"signature {what}",
                                     max_items=MAX_SIGNATURE_TENSORS):
                entry = expect_object(entry, f"signature {what[:-1]}", required=("name", "spec"))
                name = expect_string(entry["name"], f"signature {what[:-1]} name",
                                     max_chars=MAX_NAME_CHARS)
                if name in tensors[what]:
                    raise FormatError(f"signature {what[:-1]} {name!r} is listed twice")
                tensors[what][name] = TensorSpec.from_json(entry["spec"])
        programs = expect_object(data["programs"], "signature programs", optional=VARIANTS)
        dims = {}
        for key, bounds in expect_object(data.get("dims", {}), "signature dims",
                                         optional=data.get("dims", {})).items():
            bounds = expect_object(bounds, f"bounds of dimension {key!r:.80}",
                                   required=("min", "max"))
            dims[key] = (bounds["min"], bounds["max"])
        return cls(inputs=tensors["inputs"], outputs=tensors["outputs"], programs=dict(programs),
                   preprocess=preprocess_from_json(data.get("preprocess")),
                   description=data.get("description", ""), dims=dims,
                   structure=data.get("structure"))
