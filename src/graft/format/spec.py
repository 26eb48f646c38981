"""Typed tensor specs and signature specs: what a module's functions take and return.

A tensor spec is written ``dtype[dim,dim,...]``, for example ``float32[batch,3,224,224]``.
A dimension is either a fixed size (``3``) or a name (``batch``, ``seq``): a named dimension
may take any size, but every input of one call must agree on it.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping


from graft.errors import FormatError, SignatureError

__all__ = [
    "DTYPES",
    "ImagePreprocess",
    "SignatureSpec",
    "TensorSpec",
    "TextPreprocess",
    "dtype_name",
    "dtype_name_or_str",
    "preprocess_from_json",
]

#: The dtypes a spec may name. Each is also the name of the torch dtype (``torch.float32``).
DTYPES: frozenset[str] = frozenset({
    "float64", "float32", "float16", "bfloat16",
    "int64", "int32", "int16", "int8", "uint8", "bool",
})
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A derived dimension (an expression of named ones, e.g. "2*seq") is recorded but not checked.
_DERIVED = re.compile(r"^[A-Za-z0-9_+\-*/() ]+$")
_SPEC = re.compile(r"^\s*([a-z0-9]+)\s*\[(.*)\]\s*$")


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
        if self.dtype not in DTYPES:
            raise FormatError(f"tensor spec dtype {self.dtype!r} is unknown; expected one of "
                              f"{sorted(DTYPES)}")
        object.__setattr__(self, "shape", tuple(self.shape))
        for dim in self.shape:
            if isinstance(dim, bool) or not isinstance(dim, (int, str)):
                raise FormatError(f"tensor spec {self} has dimension {dim!r}; expected an int "
                                  "size or a dimension name")
            if isinstance(dim, int) and dim < 0:
                raise FormatError(f"tensor spec {self} has a negative dimension {dim}")
            if isinstance(dim, str) and not (_NAME.match(dim) or _DERIVED.match(dim)):
                raise FormatError(f"tensor spec dimension name {dim!r} is not an identifier")

    @classmethod
    def parse(cls, text: str) -> TensorSpec:
        """Parse ``"float32[batch,3,224,224]"``; ``"float32[]"`` is a scalar."""
        match = _SPEC.match(text)
        if not match:
            raise FormatError(f"tensor spec {text!r} is malformed; expected dtype[dims], "
                              "e.g. 'float32[batch,3,224,224]'")
        dims: list[int | str] = []
        body = match.group(2).strip()
        for part in body.split(",") if body else []:
            part = part.strip()
            dims.append(int(part) if part.isdigit() else part)
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
                elif isinstance(want, str) and _NAME.match(want):
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
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.size <= 0 or self.resize < self.size:
            raise FormatError(f"image preprocessing needs 0 < size <= resize, got "
                              f"size={self.size}, resize={self.resize}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise FormatError("image preprocessing needs three means and three positive stds")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise FormatError(f"image interpolation {self.interpolation!r} is unknown; "
                              "expected bilinear, bicubic or nearest")

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
        if not self.tokenizer.startswith("assets/"):
            raise FormatError(f"text preprocessing tokenizer {self.tokenizer!r} must be a "
                              "path under assets/")
        if self.max_length < 1:
            raise FormatError(f"text preprocessing max_length must be >= 1, got "
                              f"{self.max_length}")

    def to_json(self) -> dict[str, Any]:
        return {"kind": "text", "tokenizer": self.tokenizer, "max_length": self.max_length}


Preprocess = ImagePreprocess | TextPreprocess


def preprocess_from_json(data: Mapping[str, Any] | None) -> Preprocess | None:
    """Build a preprocessing step from its manifest form."""
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise FormatError(f"preprocess must be an object, got {data!r}")
    fields = {k: v for k, v in data.items() if k != "kind"}
    try:
        if data.get("kind") == "image":
            return ImagePreprocess(**fields)
        if data.get("kind") == "text":
            return TextPreprocess(**fields)
    except TypeError as exc:
        raise FormatError(f"preprocess {dict(data)!r} is malformed: {exc}") from None
    raise FormatError(f"preprocess kind {data.get('kind')!r} is unknown; expected 'image' "
                      "or 'text'")


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
    """

    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]
    programs: Mapping[str, str]
    preprocess: Preprocess | None = None
    description: str = ""
    dims: Mapping[str, tuple[int, int | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for what in ("inputs", "outputs"):
            specs = getattr(self, what)
            for key in specs:
                if not _NAME.match(key):
                    raise FormatError(f"signature {what[:-1]} name {key!r} is not an "
                                      "identifier")
            object.__setattr__(self, what, {k: TensorSpec.of(v) for k, v in specs.items()})
        if not self.inputs or not self.outputs:
            raise FormatError("a signature needs at least one input and one output")
        if "eval" not in self.programs:
            raise FormatError(f"a signature needs an 'eval' program, got {sorted(self.programs)}")
        object.__setattr__(self, "programs", dict(self.programs))
        dims = {}
        for key, bounds in self.dims.items():
            low, high = bounds
            if not isinstance(low, int) or (high is not None and not isinstance(high, int)):
                raise FormatError(f"bounds of dimension {key!r} must be integers, got {bounds!r}")
            dims[key] = (low, high)
        object.__setattr__(self, "dims", dims)

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
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SignatureSpec:
        try:
            return cls(
                inputs={d["name"]: TensorSpec.from_json(d["spec"]) for d in data["inputs"]},
                outputs={d["name"]: TensorSpec.from_json(d["spec"]) for d in data["outputs"]},
                programs=data["programs"],
                preprocess=preprocess_from_json(data.get("preprocess")),
                description=data.get("description", ""),
                dims={k: (v["min"], v["max"]) for k, v in data.get("dims", {}).items()},
            )
        except (KeyError, TypeError) as exc:
            raise FormatError(f"signature entry is malformed ({exc!r}): {data!r}"[:500]) from None
