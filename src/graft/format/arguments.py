"""What a program's nodes pass to operators: argument values, and each call checked against
the operator's schema (no torch).

The program reader (:mod:`graft.format.graph`) checks a program's structure and names; this
half of it checks every operator call, before anything is built:

- values: JSON literals, 64-bit integers, lists nested at most two levels, references to
  earlier values (:class:`Ref`) and named enumerations (:class:`Tag`: dtypes, devices,
  layouts, memory formats);
- binding: positional and keyword arguments against the schema, none missing, none twice,
  no keyword the schema lacks;
- types: each argument the kind its parameter takes (a tensor, a number, a tag, a string from
  the operator list's enumeration or pattern);
- effects: in-place updates only of buffers, and only in train programs, or of tensors the
  program itself created;
- work: the literal sizes of allocating operators, at most :data:`MAX_ELEMENTS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

from graft.format import limits
from graft.format.operators import PY_FUNCTIONS, OpSchema, Param, requested_elements

__all__ = [
    "ArgumentChecks",
    "DEVICES",
    "DTYPES",
    "LAYOUTS",
    "MAX_ELEMENTS",
    "MAX_LIST",
    "MEMORY_FORMATS",
    "Ref",
    "Tag",
    "short",
]

#: Longest list argument (sizes, tensor lists).
MAX_LIST = limits.MAX_PROGRAM_LIST
#: Most elements one operator may be asked to allocate (2**32: 16 GiB of float32), checked
#: for literal sizes here and for symbolic ones by the runner.
MAX_ELEMENTS = limits.MAX_PROGRAM_ELEMENTS
DTYPES = ("float64", "float32", "float16", "bfloat16", "complex64", "complex128", "int64",
          "int32", "int16", "int8", "uint8", "bool")
DEVICES = ("cpu", "cuda", "mps", "meta")
LAYOUTS = ("strided",)
MEMORY_FORMATS = ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")
_INT64 = 2**63
_TAGS = {"dtype": DTYPES, "device": DEVICES, "layout": LAYOUTS, "memory_format": MEMORY_FORMATS}
_TAG_OF = {"ScalarType": "dtype", "Layout": "layout", "Device": "device",
           "MemoryFormat": "memory_format"}


@dataclass(frozen=True)
class Ref:
    """A reference to an earlier value: ``slot`` counts the inputs first, then the nodes."""

    slot: int


@dataclass(frozen=True)
class Tag:
    """A non-JSON argument value: a dtype, device, layout or memory format, by name."""

    kind: str
    name: str


def short(value: Any) -> str:
    """``repr(value)``, cut to 80 characters for a message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ArgumentChecks:
    """The reader's checks of one node's arguments and result, over what it has read so far.

    A reader using these provides ``slots`` (name -> slot of each value defined so far),
    ``kinds`` (per slot: ``"Tensor"``, ``"Number"``, ``"None"``, ``("list", k)`` or
    ``("tuple", ks)``), ``roots`` (per slot: the slots whose storage the value may share),
    ``inputs`` (the program's inputs), ``train`` and ``fail``.
    """

    slots: dict[str, int]
    kinds: list[Any]
    roots: list[frozenset[int]]
    inputs: list[Any]
    train: bool

    def fail(self, reason: str, unsafe: bool = False) -> NoReturn:
        raise NotImplementedError  # pragma: no cover - the reader's

    def _value(self, value: Any, depth: int = 0) -> Any:
        """A JSON argument as the program's value: a literal, a tuple, a Ref or a Tag."""
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            if not -_INT64 <= value < _INT64:
                self.fail(f"the integer {value} does not fit in 64 bits")
            return value
        if isinstance(value, float):
            return value
        if isinstance(value, list):
            if len(value) > MAX_LIST:
                self.fail(f"a list of {len(value)} items is over the limit of {MAX_LIST}")
            if depth > 1:
                self.fail("lists nest at most two levels")
            return tuple(self._value(v, depth + 1) for v in value)
        if isinstance(value, dict) and len(value) == 1:
            ((tag, body),) = value.items()
            if tag == "ref":
                if not isinstance(body, str) or body not in self.slots:
                    self.fail(f"it refers to {short(body)} before defining it")
                return Ref(self.slots[body])
            if tag == "float" and body in ("inf", "-inf", "nan"):
                return float(body)
            if tag in _TAGS and body in _TAGS[tag]:
                return Tag(tag, body)
        self.fail(f"the argument {short(value)} is not a program value (a literal, a list, a "
                  "reference or a tag; see docs/format.md)")

    def _kind(self, value: Any) -> Any:
        return self.kinds[value.slot] if isinstance(value, Ref) else None

    def _py_function(self, target: str, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        if kwargs or len(args) != PY_FUNCTIONS[target]:
            self.fail(f"{target} takes {PY_FUNCTIONS[target]} positional arguments")
        if target == "operator.getitem":
            container, index = args
            kind = self._kind(container)
            roots = self.roots[container.slot] if isinstance(container, Ref) else None
            if isinstance(kind, tuple) and kind[0] == "tuple":
                if isinstance(index, int) and not isinstance(index, bool) \
                        and 0 <= index < len(kind[1]):
                    return kind[1][index], roots
                self.fail(f"index {short(index)} is out of range for a result of "
                          f"{len(kind[1])} values")
            if isinstance(kind, tuple) and kind[0] == "list":
                if (isinstance(index, int) and not isinstance(index, bool)
                        or self._kind(index) == "Number"):
                    return kind[1], roots
                self.fail(f"index {short(index)} is not an integer")
            self.fail("operator.getitem applies only to an operator's list or tuple result")
        for value in args:
            if not (isinstance(value, (int, float)) or self._kind(value) == "Number"):
                self.fail(f"{target} takes numbers (sizes), got {short(value)}")
        return "Number", frozenset()

    def _operator(self, op: OpSchema, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        positional = [p for p in op.params if not p.kwarg_only]
        if len(args) > len(positional):
            self.fail(f"{op.name} takes at most {len(positional)} positional arguments, got "
                      f"{len(args)} ({op.schema})")
        bound = dict(zip((p.name for p in positional), args))
        names = {p.name for p in op.params}
        for key, value in kwargs.items():
            if key not in names:
                self.fail(f"{op.name} has no argument {key!r} ({op.schema})", unsafe=True)
            if key in bound:
                self.fail(f"{op.name} argument {key!r} is given twice")
            bound[key] = value
        for param in op.params:
            if param.name not in bound:
                if not param.has_default and not param.optional:
                    self.fail(f"{op.name} needs argument {param.name!r} ({op.schema})")
                continue
            self._check(op, param, bound[param.name])
        if op.mutates:
            self._check_effects(op, bound)
        elements = requested_elements(op, bound, lambda _: None) if op.sized else None
        if elements is not None and elements > MAX_ELEMENTS:
            self.fail(f"{op.name} asks for {elements} elements, over the limit of "
                      f"{MAX_ELEMENTS}")
        return self._result(op, bound)

    def _check(self, op: OpSchema, param: Param, value: Any) -> None:
        if value is None and param.optional:
            return
        if param.is_list:
            element = "Tensor" if param.base == "Tensor" else "Number"
            if self._kind(value) == ("list", element):
                return  # an operator's list result, passed on whole
            items = (value,) if isinstance(value, int) and param.base in ("int", "SymInt") \
                else value
            if not isinstance(items, tuple):
                self.fail(f"{op.name} argument {param.name!r} must be a list of "
                          f"{param.base}, got {short(value)}")
            for item in items:
                if not (item is None and param.elem_optional):
                    self._check_one(op, param, item)
            return
        self._check_one(op, param, value)

    def _check_one(self, op: OpSchema, param: Param, value: Any) -> None:
        base, kind = param.base, self._kind(value)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if base == "Tensor":
            # torch.export writes Python numbers where an operator wraps them as 0-d tensors
            # (``add.Tensor(x, 1)``); a tensor list holds tensors only.
            ok = kind == "Tensor" or (not param.is_list and (
                number or isinstance(value, bool) or kind == "Number"))
        elif base in ("int", "SymInt"):
            ok = (isinstance(value, int) and not isinstance(value, bool)) or kind == "Number"
        elif base == "float":
            ok = number or kind == "Number"
        elif base == "bool":
            ok = isinstance(value, bool) or kind == "Number"
        elif base == "Scalar":
            ok = number or isinstance(value, bool) or kind == "Number"
        elif base in _TAG_OF:
            ok = isinstance(value, Tag) and value.kind == _TAG_OF[base]
        elif base == "str":
            ok = isinstance(value, str) and (
                (param.choices is not None and value in param.choices)
                or (param.pattern is not None and param.pattern.fullmatch(value) is not None))
            if not ok:
                allowed = list(param.choices) if param.choices is not None else "a pattern"
                self.fail(f"{op.name} argument {param.name!r} is {short(value)}, not one of "
                          f"{allowed}")
        else:  # Generator: only None (the default generator), handled by the caller
            ok = False
        if not ok:
            self.fail(f"{op.name} argument {param.name!r} must be {base}, got "
                      f"{short(value)}{' (a ' + str(kind) + ')' if kind else ''}")

    def _check_effects(self, op: OpSchema, bound: dict[str, Any]) -> None:
        for param in op.params:
            if not param.mutable or bound.get(param.name) is None:
                continue
            if param.mutable_when is not None and bound.get(param.mutable_when) is False:
                continue
            value = bound[param.name]
            if not isinstance(value, Ref):
                self.fail(f"{op.name} updates {param.name!r}, which must be a tensor")
            for root in self.roots[value.slot]:
                if root >= len(self.inputs):
                    continue  # a tensor this program created
                source = self.inputs[root]
                if source.kind != "buffer":
                    self.fail(f"{op.name} updates {source.kind} {source.name!r} in place; "
                              "a program may update only buffers", unsafe=True)
                if not self.train:
                    self.fail(f"{op.name} updates buffer {source.name!r} in an eval program; "
                              "only train programs may update buffers", unsafe=True)

    def _result(self, op: OpSchema, bound: dict[str, Any]) -> tuple[Any, frozenset[int] | None]:
        kinds = []
        aliased: set[int] = set()
        for kind, alias in op.returns:
            base = kind.removesuffix("[]")
            elem = "Tensor" if base == "Tensor" else "Number"
            kinds.append(("list", elem) if kind.endswith("[]") else elem)
            if alias is not None:
                for param in op.params:
                    value = bound.get(param.name)
                    if param.alias == alias and isinstance(value, Ref):
                        aliased |= self.roots[value.slot]
        if not kinds:
            kind: Any = "None"
        else:
            kind = kinds[0] if len(kinds) == 1 else ("tuple", tuple(kinds))
        return kind, (frozenset(aliased) if aliased else None)
