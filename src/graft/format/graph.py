"""Programs as data: reading and validating ``graft.graph/1`` JSON completely (no torch).

A program is the ATen graph of one signature in one variant. This reader is the security
boundary between a module's bytes and the runner: it turns untrusted JSON into frozen
dataclasses and refuses, before anything is built, every program that is not exactly what the
format allows:

- structure: the four top-level keys, input, node and output records with their keys only;
- names: unique, ``[A-Za-z_][A-Za-z0-9_]*``, and data only (the runner never compiles them);
- operators: each target is a key of the closed list ``operators.json`` (or one of a few
  functions on sizes); nothing else names code;
- arguments: bound to the operator's schema (counts, keyword names) and type-checked per
  argument; strings only from the enumeration that the list stores;
- references: defined before use, of the kind the argument needs (a tensor, a size);
- effects: in-place updates only of buffers, and only in train programs, or of tensors the
  program itself created;
- work: node, list and byte limits, and literal sizes of allocating operators.

The runner (``graft.runtime.program``) executes a ``Graph`` only through this module's
output, and checks at run time the sizes this reader cannot know (symbolic ones).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from graft.errors import FormatError, UnsafeContentError
from graft.format import limits
from graft.format.jsonio import loads
from graft.format.operators import PY_FUNCTIONS, OpSchema, Param, operator_list, \
    requested_elements

__all__ = [
    "DEVICES",
    "DTYPES",
    "GRAPH_FORMAT",
    "Graph",
    "INPUT_KINDS",
    "Input",
    "LAYOUTS",
    "MAX_ELEMENTS",
    "MAX_LIST",
    "MAX_NODES",
    "MAX_PROGRAM_BYTES",
    "MEMORY_FORMATS",
    "NAME",
    "Node",
    "OUTPUT_KINDS",
    "Output",
    "Ref",
    "Tag",
    "graph_from_json",
    "graph_text",
    "read_graph",
]

GRAPH_FORMAT = "graft.graph/1"
# The limits live with every other format limit (graft/format/limits.py, docs/format.md).
#: Largest program file accepted.
MAX_PROGRAM_BYTES = limits.MAX_PROGRAM_BYTES
#: Most nodes (and inputs, and outputs) in one program.
MAX_NODES = limits.MAX_PROGRAM_NODES
#: Longest list argument (sizes, tensor lists).
MAX_LIST = limits.MAX_PROGRAM_LIST
#: Most elements one operator may be asked to allocate (2**32: 16 GiB of float32), checked
#: for literal sizes here and for symbolic ones by the runner.
MAX_ELEMENTS = limits.MAX_PROGRAM_ELEMENTS
INPUT_KINDS = ("parameter", "buffer", "constant", "input")
OUTPUT_KINDS = ("output", "buffer_mutation")
DTYPES = ("float64", "float32", "float16", "bfloat16", "complex64", "complex128", "int64",
          "int32", "int16", "int8", "uint8", "bool")
DEVICES = ("cpu", "cuda", "mps", "meta")
LAYOUTS = ("strided",)
MEMORY_FORMATS = ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")
#: What input, node and keyword names must match in full.
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
# As the manifest names tensors: dotted identifiers, no dunder parts, at most 512 characters.
_TENSOR_NAME = re.compile(r"(?=.{1,512}\Z)(?!__)[A-Za-z0-9_]+(\.(?!__)[A-Za-z0-9_]+)*", re.S)
_INT64 = 2**63
_TAGS = {"dtype": DTYPES, "device": DEVICES, "layout": LAYOUTS, "memory_format": MEMORY_FORMATS}


# -- what a validated program is --------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """A reference to an earlier value: ``slot`` counts the inputs first, then the nodes."""

    slot: int


@dataclass(frozen=True)
class Tag:
    """A non-JSON argument value: a dtype, device, layout or memory format, by name."""

    kind: str
    name: str


@dataclass(frozen=True)
class Input:
    """A graph input: a module parameter or buffer, a program constant, or a user input."""

    name: str
    kind: str
    target: str | None


@dataclass(frozen=True)
class Node:
    """One operator call; ``args``/``kwargs`` hold literals, ``Tag``s, ``Ref``s and tuples."""

    name: str
    target: str
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Output:
    """A graph output: a signature output, or the new value of buffer ``target``."""

    kind: str
    value: Ref
    target: str | None = None


@dataclass(frozen=True)
class Graph:
    """A completely validated program."""

    inputs: tuple[Input, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[Output, ...]


# -- reading ----------------------------------------------------------------------------------


def read_graph(data: bytes, *, name: str, train: bool = True) -> Graph:
    """Parse and completely validate ``graft.graph/1`` bytes.

    Args:
        data: The program file's bytes.
        name: What to call the program in messages (its path inside the module).
        train: Whether this is a train program, the only kind that may update buffers.

    Raises:
        FormatError: the bytes are not a valid program (names the file, node and reason).
        UnsafeContentError: the program calls something outside the operator list or
            updates what it may not.
    """
    parsed = loads(data, what=f"program {name}", max_bytes=MAX_PROGRAM_BYTES)
    return graph_from_json(parsed, name=name, train=train)


def graph_from_json(data: Any, *, name: str, train: bool = True) -> Graph:
    """Validate already-parsed program JSON (see :func:`read_graph`)."""
    return _Reader(name, train).read(data)


def _keys(obj: Any, required: set[str], optional: set[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise FormatError(f"{what} must be a JSON object, got {type(obj).__name__}")
    missing, extra = required - obj.keys(), obj.keys() - required - optional
    if missing or extra:
        raise FormatError(f"{what} must have the keys {sorted(required)}"
                          + (f" (and optionally {sorted(optional)})" if optional else "")
                          + f"; it has {sorted(map(str, obj))[:8]}")
    return obj


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Reader:
    """One validation pass; slots, kinds and alias roots of every value defined so far."""

    def __init__(self, name: str, train: bool) -> None:
        self.name = name
        self.train = train
        self.slots: dict[str, int] = {}
        self.kinds: list[Any] = []  # "Tensor", "Number", "None", ("list", k), ("tuple", ks)
        self.roots: list[frozenset[int]] = []
        self.inputs: list[Input] = []
        self.where = ""

    def fail(self, reason: str, unsafe: bool = False) -> None:
        cls = UnsafeContentError if unsafe else FormatError
        raise cls(f"program {self.name}{self.where}: {reason}; re-export the module with "
                  "graft.save, or do not load it if you did not make it")

    def read(self, data: Any) -> Graph:
        if isinstance(data, dict) and data.get("format") != GRAPH_FORMAT:
            found = data.get("format")
            hint = (" (written by a newer Graft: upgrade Graft)"
                    if isinstance(found, str) and found.startswith("graft.graph/") else "")
            raise FormatError(f"program {self.name} has format {_short(found)}; this Graft "
                              f"reads {GRAPH_FORMAT!r}{hint}")
        data = self._keys(data, {"format", "inputs", "nodes", "outputs"}, set(), "the program")
        inputs, nodes, outputs = data["inputs"], data["nodes"], data["outputs"]
        for key, value in (("inputs", inputs), ("nodes", nodes), ("outputs", outputs)):
            if not isinstance(value, list):
                self.fail(f"'{key}' must be a list")
            if len(value) > MAX_NODES:
                self.fail(f"'{key}' has {len(value)} entries, over the limit of {MAX_NODES}")
        for index, raw in enumerate(inputs):
            self.where = f", input {index}"
            self._input(raw)
        table = operator_list()
        built = []
        for index, raw in enumerate(nodes):
            self.where = f", node {index}"
            built.append(self._node(raw, table))
        out = []
        for index, raw in enumerate(outputs):
            self.where = f", output {index}"
            out.append(self._output(raw))
        self.where = ""
        if not any(o.kind == "output" for o in out):
            self.fail("it returns no outputs")
        return Graph(tuple(self.inputs), tuple(built), tuple(out))

    def _keys(self, obj: Any, required: set[str], optional: set[str], what: str) -> dict:
        try:
            return _keys(obj, required, optional, what)
        except FormatError as exc:
            self.fail(str(exc))
            raise  # pragma: no cover - fail() raises

    def _define(self, name: Any, kind: Any, roots: frozenset[int] | None) -> int:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            self.fail(f"the name {_short(name)} is not an identifier "
                      "([A-Za-z_][A-Za-z0-9_]*, at most 200 characters)", unsafe=True)
        if name in self.slots:
            self.fail(f"the name {name!r} is defined twice")
        slot = len(self.kinds)
        self.slots[name] = slot
        self.kinds.append(kind)
        self.roots.append(frozenset({slot}) if roots is None else roots)
        return slot

    def _input(self, raw: Any) -> None:
        raw = self._keys(raw, {"name", "kind"}, {"target"}, "an input")
        kind, target = raw["kind"], raw.get("target")
        if kind not in INPUT_KINDS:
            self.fail(f"input kind {_short(kind)} is not one of {INPUT_KINDS}")
        if (kind == "input") != (target is None):
            self.fail(f"a {kind} input must {'not ' if kind == 'input' else ''}name a target "
                      "tensor")
        if target is not None and not (isinstance(target, str)
                                       and _TENSOR_NAME.fullmatch(target)):
            self.fail(f"input target {_short(target)} is not a tensor name", unsafe=True)
        self._define(raw["name"], "Tensor", None)
        self.inputs.append(Input(raw["name"], kind, target))

    # -- nodes --------------------------------------------------------------------------------

    def _node(self, raw: Any, table: Mapping[str, OpSchema]) -> Node:
        raw = self._keys(raw, {"name", "target", "args", "kwargs"}, set(), "a node")
        if isinstance(raw["name"], str) and NAME.fullmatch(raw["name"]):
            self.where += f" ({raw['name']})"
        target = raw["target"]
        if not isinstance(target, str) or (target not in table and target not in PY_FUNCTIONS):
            self.fail(f"it calls {_short(target)}, which is not in Graft's operator list "
                      f"for {GRAPH_FORMAT} (graft/format/operators.json, see docs/format.md); "
                      "only listed pure tensor operators can run", unsafe=True)
        args, kwargs = raw["args"], raw["kwargs"]
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            self.fail("'args' must be a list and 'kwargs' an object")
        args = tuple(self._value(v) for v in args)
        for key in kwargs:
            if not NAME.fullmatch(key):
                self.fail(f"keyword {_short(key)} is not an identifier", unsafe=True)
        kwargs = {k: self._value(v) for k, v in kwargs.items()}
        if target in PY_FUNCTIONS:
            kind, roots = self._py_function(target, args, kwargs)
        else:
            kind, roots = self._operator(table[target], args, kwargs)
        self._define(raw["name"], kind, roots)
        return Node(raw["name"], target, args, tuple(kwargs.items()))

    def _value(self, value: Any, depth: int = 0) -> Any:
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
                    self.fail(f"it refers to {_short(body)} before defining it")
                return Ref(self.slots[body])
            if tag == "float" and body in ("inf", "-inf", "nan"):
                return float(body)
            if tag in _TAGS and body in _TAGS[tag]:
                return Tag(tag, body)
        self.fail(f"the argument {_short(value)} is not a {GRAPH_FORMAT} value")

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
                self.fail(f"index {_short(index)} is out of range for a result of "
                          f"{len(kind[1])} values")
            if isinstance(kind, tuple) and kind[0] == "list":
                if (isinstance(index, int) and not isinstance(index, bool)
                        or self._kind(index) == "Number"):
                    return kind[1], roots
                self.fail(f"index {_short(index)} is not an integer")
            self.fail("operator.getitem applies only to an operator's list or tuple result")
        for value in args:
            if not (isinstance(value, (int, float)) or self._kind(value) == "Number"):
                self.fail(f"{target} takes numbers (sizes), got {_short(value)}")
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
                          f"{param.base}, got {_short(value)}")
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
        elif base in ("ScalarType", "Layout", "Device", "MemoryFormat"):
            tag = {"ScalarType": "dtype", "Layout": "layout", "Device": "device",
                   "MemoryFormat": "memory_format"}[base]
            ok = isinstance(value, Tag) and value.kind == tag
        elif base == "str":
            ok = isinstance(value, str) and (
                (param.choices is not None and value in param.choices)
                or (param.pattern is not None and param.pattern.fullmatch(value) is not None))
            if not ok:
                allowed = list(param.choices) if param.choices is not None else "a pattern"
                self.fail(f"{op.name} argument {param.name!r} is {_short(value)}, not one of "
                          f"{allowed}")
        else:  # Generator: only None (the default generator), handled by the caller
            ok = False
        if not ok:
            self.fail(f"{op.name} argument {param.name!r} must be {base}, got "
                      f"{_short(value)}{' (a ' + str(kind) + ')' if kind else ''}")

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

    # -- outputs ------------------------------------------------------------------------------

    def _output(self, raw: Any) -> Output:
        raw = self._keys(raw, {"kind", "value"}, {"target"}, "an output")
        kind, target = raw["kind"], raw.get("target")
        if kind not in OUTPUT_KINDS:
            self.fail(f"output kind {_short(kind)} is not one of {OUTPUT_KINDS}")
        value = raw["value"]
        if not (isinstance(value, dict) and set(value) == {"ref"}):
            self.fail(f"output value {_short(value)} must be a reference to a tensor")
        ref = self._value(value)
        if self.kinds[ref.slot] != "Tensor":
            self.fail(f"output {_short(value['ref'])} is not a tensor")
        if kind == "output":
            if target is not None:
                self.fail("a signature output names no target")
            return Output(kind, ref)
        buffers = {i.target for i in self.inputs if i.kind == "buffer"}
        if target not in buffers:
            self.fail(f"buffer_mutation target {_short(target)} is not a buffer input of this "
                      "program", unsafe=True)
        if not self.train:
            self.fail(f"an eval program updates buffer {target!r}", unsafe=True)
        return Output(kind, ref, target)


# -- for people -------------------------------------------------------------------------------


def graph_text(graph: Graph) -> str:
    """Readable Python-like text of a program, for people; never executed.

    Every identifier in it is Graft's own (``in0``, ``n0``, ...): the names stored in the
    file appear only as quoted, escaped comments.
    """
    names = [f"in{i}" for i in range(len(graph.inputs))]
    names += [f"n{i}" for i in range(len(graph.nodes))]

    def show(value: Any) -> str:
        if isinstance(value, Ref):
            return names[value.slot]
        if isinstance(value, Tag):
            return f"{value.kind}.{value.name}"
        if isinstance(value, tuple):
            return "[" + ", ".join(show(v) for v in value) + "]"
        return ascii(value)

    user = [names[i] for i, inp in enumerate(graph.inputs) if inp.kind == "input"]
    lines = [f"def program({', '.join(user)}):"]
    for i, inp in enumerate(graph.inputs):
        source = "input" if inp.kind == "input" else f"{inp.kind}({ascii(inp.target)})"
        lines.append(f"    # {names[i]} = {source}  # {ascii(inp.name)}")
    offset = len(graph.inputs)
    for i, node in enumerate(graph.nodes):
        args = [show(a) for a in node.args] + [f"{k}={show(v)}" for k, v in node.kwargs]
        call = node.target if node.target in PY_FUNCTIONS else f"torch.ops.{node.target}"
        lines.append(f"    {names[offset + i]} = {call}({', '.join(args)})"
                     f"  # {ascii(node.name)}")
    for out in graph.outputs:
        if out.kind == "buffer_mutation":
            lines.append(f"    buffer({ascii(out.target)}).copy_({show(out.value)})")
    results = [show(o.value) for o in graph.outputs if o.kind == "output"]
    lines.append(f"    return ({', '.join(results)},)")
    return "\n".join(lines) + "\n"
