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

The checks of each operator call (values, binding, types, effects, work) are in
:mod:`graft.format.arguments`, which this reader extends. The runner
(``graft.runtime.program``) executes a ``Graph`` only through this module's output, and checks
at run time the sizes this reader cannot know (symbolic ones).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from graft.errors import FormatError, UnsafeContentError
from graft.format import limits
from graft.format.arguments import ArgumentChecks, Ref, Tag, short
from graft.format.jsonio import loads
from graft.format.operators import PY_FUNCTIONS, OpSchema, operator_list

__all__ = [
    "GRAPH_FORMAT",
    "Graph",
    "INPUT_KINDS",
    "Input",
    "MAX_NODES",
    "MAX_PROGRAM_BYTES",
    "NAME",
    "Node",
    "OUTPUT_KINDS",
    "Output",
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
INPUT_KINDS = ("parameter", "buffer", "constant", "input")
OUTPUT_KINDS = ("output", "buffer_mutation")
#: What input, node and keyword names must match in full.
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
# As the manifest names tensors: dotted identifiers, no dunder parts, at most 512 characters.
_TENSOR_NAME = re.compile(r"(?=.{1,512}\Z)(?!__)[A-Za-z0-9_]+(\.(?!__)[A-Za-z0-9_]+)*", re.S)


# -- what a validated program is --------------------------------------------------------------


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


class _Reader(ArgumentChecks):
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
            raise FormatError(f"program {self.name} has format {short(found)}; this Graft "
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
            self.fail(f"the name {short(name)} is not an identifier "
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
            self.fail(f"input kind {short(kind)} is not one of {INPUT_KINDS}")
        if (kind == "input") != (target is None):
            self.fail(f"a {kind} input must {'not ' if kind == 'input' else ''}name a target "
                      "tensor")
        if target is not None and not (isinstance(target, str)
                                       and _TENSOR_NAME.fullmatch(target)):
            self.fail(f"input target {short(target)} is not a tensor name", unsafe=True)
        self._define(raw["name"], "Tensor", None)
        self.inputs.append(Input(raw["name"], kind, target))

    # -- nodes --------------------------------------------------------------------------------

    def _node(self, raw: Any, table: Mapping[str, OpSchema]) -> Node:
        raw = self._keys(raw, {"name", "target", "args", "kwargs"}, set(), "a node")
        if isinstance(raw["name"], str) and NAME.fullmatch(raw["name"]):
            self.where += f" ({raw['name']})"
        target = raw["target"]
        if not isinstance(target, str) or (target not in table and target not in PY_FUNCTIONS):
            self.fail(f"it calls {short(target)}, which is not in Graft's operator list "
                      f"for {GRAPH_FORMAT} (graft/format/operators.json, see docs/format.md); "
                      "only listed pure tensor operators can run", unsafe=True)
        args, kwargs = raw["args"], raw["kwargs"]
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            self.fail("'args' must be a list and 'kwargs' an object")
        args = tuple(self._value(v) for v in args)
        for key in kwargs:
            if not NAME.fullmatch(key):
                self.fail(f"keyword {short(key)} is not an identifier", unsafe=True)
        kwargs = {k: self._value(v) for k, v in kwargs.items()}
        if target in PY_FUNCTIONS:
            kind, roots = self._py_function(target, args, kwargs)
        else:
            kind, roots = self._operator(table[target], args, kwargs)
        self._define(raw["name"], kind, roots)
        return Node(raw["name"], target, args, tuple(kwargs.items()))

    # -- outputs ------------------------------------------------------------------------------

    def _output(self, raw: Any) -> Output:
        raw = self._keys(raw, {"kind", "value"}, {"target"}, "an output")
        kind, target = raw["kind"], raw.get("target")
        if kind not in OUTPUT_KINDS:
            self.fail(f"output kind {short(kind)} is not one of {OUTPUT_KINDS}")
        value = raw["value"]
        if not (isinstance(value, dict) and set(value) == {"ref"}):
            self.fail(f"output value {short(value)} must be a reference to a tensor")
        ref = self._value(value)
        if self.kinds[ref.slot] != "Tensor":
            self.fail(f"output {short(value['ref'])} is not a tensor")
        if kind == "output":
            if target is not None:
                self.fail("a signature output names no target")
            return Output(kind, ref)
        buffers = {i.target for i in self.inputs if i.kind == "buffer"}
        if target not in buffers:
            self.fail(f"buffer_mutation target {short(target)} is not a buffer input of this "
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
