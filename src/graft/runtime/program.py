"""Running programs: an interpreter over validated ``graft.graph`` nodes (no generated code).

A program is the ATen graph of one signature in one variant (``eval`` or ``train``), stored
without weights: its inputs name the module's parameters and buffers, and the runtime passes
the module's own tensor objects in, so every signature and variant shares one set of weights.

Nothing from a program's bytes becomes Python source, a compiled name or an attribute lookup.
``graft.format.graph`` validates the whole file first; this runner then calls, node by node,
operator objects resolved once per process from Graft's own operator list (the artifact's
target string is only a key into that table). Values are dropped as soon as their last use
is past, so peak memory is what an eager forward pass needs. Two things only the running
program knows are checked here: the element count of an allocation whose size is symbolic,
and that an in-place operator never writes into a parameter, constant or user input through
an alias the schema does not declare.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from graft.errors import FormatError, ProgramError
from graft.format.arguments import DTYPES, LAYOUTS, MAX_ELEMENTS, MEMORY_FORMATS, Ref, Tag
from graft.format.graph import Graph, graph_from_json, graph_text, read_graph
from graft.format.operators import PY_FUNCTIONS, OpSchema, operator_list, requested_elements

__all__ = ["PY_TARGETS", "Program", "program_from_json"]

#: The Python functions on sizes a program may call, by the name ``graft.graph`` stores.
PY_TARGETS: dict[str, Callable[..., Any]] = {
    **{f"operator.{n}": getattr(operator, n) for n in (
        "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "getitem", "eq", "ne",
        "lt", "le", "gt", "ge", "and_", "or_", "not_", "abs")},
    **{f"math.{n}": getattr(math, n) for n in ("ceil", "floor", "sqrt", "trunc")},
    **{f"torch.{n}": getattr(torch, n) for n in (
        "sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_sqrt", "sym_ite")},
    "builtins.min": min,
    "builtins.max": max,
}
if set(PY_TARGETS) != set(PY_FUNCTIONS):  # pragma: no cover - the two tables are Graft's own
    raise ImportError("graft.runtime.program.PY_TARGETS disagrees with graft.format.graph")

_DTYPES = {name: getattr(torch, name) for name in DTYPES}
_LAYOUTS = {"strided": torch.strided}
_MEMORY_FORMATS = {name: getattr(torch, name) for name in MEMORY_FORMATS}
assert set(_LAYOUTS) == set(LAYOUTS)
_RESOLVED: dict[str, Callable[..., Any]] = {}


def _resolve(name: str) -> Callable[..., Any]:
    """The callable for a validated target, looked up once from the shipped list's entry."""
    fn = _RESOLVED.get(name)
    if fn is not None:
        return fn
    if name in PY_TARGETS:
        fn = PY_TARGETS[name]
    else:
        schema = operator_list()[name]
        # The three parts come from operators.json (Graft's own data), never from a module.
        namespace, op, overload = schema.name.split(".")
        try:
            fn = getattr(getattr(getattr(torch.ops, namespace), op), overload)
        except (AttributeError, RuntimeError):
            raise FormatError(f"{name} is in Graft's operator list but not in this PyTorch "
                              f"({torch.__version__}); install the PyTorch that Graft "
                              "supports") from None
        if not isinstance(fn, torch._ops.OpOverload):  # pragma: no cover - torch's own table
            raise FormatError(f"{name} does not resolve to an operator in this PyTorch")
    _RESOLVED[name] = fn
    return fn


class _Slot:
    """A reference inside a compiled argument list."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


@dataclass
class _Step:
    fn: Callable[..., Any]
    name: str
    target: str
    args: list[Any]
    refs: list[tuple[int, int]]  # (argument position, slot)
    nested: list[tuple[int, list[Any]]]  # (argument position, list holding _Slots)
    kwargs: dict[str, Any]
    kwarg_refs: list[tuple[str, Any]]
    slot: int
    free: tuple[int, ...]
    schema: OpSchema | None  # set when the step needs a run-time check
    sized: bool
    mutated: tuple[tuple[str, str | None], ...]  # (argument, flag that enables the update)


class Program:
    """A validated program, ready to run.

    Args:
        graph: The validated graph (from :func:`graft.format.graph.read_graph`).
        name: What to call it in messages.
        device: Where tensors the graph creates (``arange``, ``zeros``, ...) are placed;
            ``None``: the device recorded at export.
        train: Whether it is a train program (may update buffers).
    """

    def __init__(self, graph: Graph, *, name: str = "program",
                 device: torch.device | None = None, train: bool = True) -> None:
        self.graph = graph
        self.name = name
        self.train = train
        self.inputs = graph.inputs
        self.outputs = graph.outputs
        self.num_user_inputs = sum(i.kind == "input" for i in graph.inputs)
        self._device = device
        self._steps = self._compile()
        self._output_slots = [o.value.slot for o in graph.outputs]
        self._mutates = any(s.mutated for s in self._steps)

    # -- building -----------------------------------------------------------------------------

    def _literal(self, value: Any) -> Any:
        if isinstance(value, Tag):
            if value.kind == "dtype":
                return _DTYPES[value.name]
            if value.kind == "device":
                # Tensors a program creates go where the module's weights are, not where the
                # author happened to export it.
                return self._device if self._device is not None else torch.device(value.name)
            if value.kind == "layout":
                return _LAYOUTS[value.name]
            return _MEMORY_FORMATS[value.name]
        return value

    def _arg(self, value: Any) -> tuple[Any, bool]:
        """A compiled argument, and whether it holds references."""
        if isinstance(value, Ref):
            return _Slot(value.slot), True
        if isinstance(value, tuple):
            items = [self._arg(v) for v in value]
            return [v for v, _ in items], any(has for _, has in items)
        return self._literal(value), False

    def _compile(self) -> list[_Step]:
        graph = self.graph
        offset = len(graph.inputs)
        last_use: dict[int, int] = {}
        for index, node in enumerate(graph.nodes):
            for value in (*node.args, *(v for _, v in node.kwargs)):
                for slot in _slots(value):
                    last_use[slot] = index
        keep = {o.value.slot for o in graph.outputs}
        frees: dict[int, list[int]] = {}
        for slot, index in last_use.items():
            if slot not in keep:
                frees.setdefault(index, []).append(slot)
        table = operator_list()
        steps = []
        for index, node in enumerate(graph.nodes):
            args, refs, nested = [], [], []
            for position, value in enumerate(node.args):
                compiled, has_refs = self._arg(value)
                args.append(compiled)
                if isinstance(compiled, _Slot):
                    refs.append((position, compiled.index))
                elif has_refs:
                    nested.append((position, compiled))
            kwargs, kwarg_refs = {}, []
            for key, value in node.kwargs:
                compiled, has_refs = self._arg(value)
                kwargs[key] = compiled
                if has_refs:
                    kwarg_refs.append((key, compiled))
            schema = table.get(node.target)
            sized = schema is not None and schema.sized
            mutated: tuple[tuple[str, str | None], ...] = ()
            if schema is not None:
                literal = dict(zip((p.name for p in schema.params if not p.kwarg_only),
                                   node.args)) | dict(node.kwargs)
                # Batch norm in inference mode (``training=False`` written in the graph)
                # updates nothing: no run-time check on every call.
                mutated = tuple((p.name, p.mutable_when) for p in schema.params if p.mutable
                                and not (p.mutable_when and literal.get(p.mutable_when) is False))
            steps.append(_Step(_resolve(node.target), node.name, node.target, args, refs,
                               nested, kwargs, kwarg_refs, offset + index,
                               tuple(frees.get(index, ())),
                               schema if (sized or mutated) else None, sized, mutated))
        return steps

    def check_bindings(self, state: Mapping[str, torch.Tensor],
                       constants: Mapping[str, torch.Tensor]) -> None:
        """Refuse a program whose inputs name tensors the module does not have."""
        for entry in self.inputs:
            if entry.kind in ("parameter", "buffer") and entry.target not in state:
                raise FormatError(f"program {self.name} takes {entry.kind} {entry.target!r}, "
                                  "which the module's weights do not hold")
            if entry.kind == "constant" and entry.target not in constants:
                raise FormatError(f"program {self.name} takes constant {entry.target!r}, "
                                  "which its .constants.safetensors does not hold")

    # -- running ------------------------------------------------------------------------------

    def __call__(self, state: Mapping[str, torch.Tensor], constants: Mapping[str, torch.Tensor],
                 user_inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run the graph over ``state`` (module tensors by name) and the user's inputs."""
        env: list[Any] = [None] * (len(self.inputs) + len(self._steps))
        feed = iter(user_inputs)
        for slot, entry in enumerate(self.inputs):
            if entry.kind == "input":
                env[slot] = next(feed)
            elif entry.kind == "constant":
                env[slot] = constants[entry.target]
            else:
                env[slot] = state[entry.target]
        protected = self._protected(env) if self._mutates else frozenset()
        for step in self._steps:
            args = step.args
            if step.refs or step.nested:
                args = list(args)
                for position, slot in step.refs:
                    args[position] = env[slot]
                for position, items in step.nested:
                    args[position] = _load(items, env)
            kwargs = step.kwargs
            if step.kwarg_refs:
                kwargs = dict(kwargs)
                for key, value in step.kwarg_refs:
                    kwargs[key] = _load(value, env)
            if step.schema is not None:
                self._check(step, args, kwargs, protected)
            try:
                env[step.slot] = step.fn(*args, **kwargs)
            except Exception as exc:  # torch raises many types; name the node that failed
                raise ProgramError(f"program {self.name}: node {step.name!r} "
                                   f"({step.target}) failed: {type(exc).__name__}: "
                                   f"{exc}"[:1000]) from exc
            for slot in step.free:
                env[slot] = None
        outputs = []
        for out, slot in zip(self.outputs, self._output_slots):
            if out.kind == "output":
                outputs.append(env[slot])
            else:
                with torch.no_grad():
                    state[out.target].copy_(env[slot])
        return outputs

    def _protected(self, env: list[Any]) -> frozenset[int]:
        """Storages an in-place operator must not write: all inputs but buffers (train)."""
        ptrs = set()
        for slot, entry in enumerate(self.inputs):
            if entry.kind == "buffer" and self.train:
                continue
            value = env[slot]
            if isinstance(value, torch.Tensor) and value.numel():
                try:
                    ptrs.add(value.untyped_storage().data_ptr())
                except RuntimeError:
                    # A fake tensor: torch.export (graft export onnx, saving a model that holds
                    # a module) is tracing through the runtime, and has no storage to protect.
                    continue
        return frozenset(ptrs)

    def _check(self, step: _Step, args: list[Any], kwargs: dict[str, Any],
               protected: frozenset[int]) -> None:
        schema = step.schema
        assert schema is not None
        names = [p.name for p in schema.params if not p.kwarg_only]
        bound = dict(zip(names, args)) | kwargs
        if step.sized:
            elements = requested_elements(
                schema, bound, lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else None)
            # A symbolic count (torch.export tracing a dynamic batch) is left to the real run:
            # comparing it would narrow the traced dimension to this limit.
            if (elements is not None and not isinstance(elements, torch.SymInt)
                    and elements > MAX_ELEMENTS):
                raise ProgramError(f"program {self.name}: node {step.name!r} ({step.target}) "
                                   f"asks for {elements} elements, over the limit of "
                                   f"{MAX_ELEMENTS}; check the input sizes")
        for key, when in step.mutated:
            value = bound.get(key)
            if when is not None and not bound.get(when):
                continue
            # Nothing is protected while torch.export traces fake tensors (see _protected).
            if (protected and isinstance(value, torch.Tensor) and value.numel()
                    and value.untyped_storage().data_ptr() in protected):
                raise ProgramError(f"program {self.name}: node {step.name!r} ({step.target}) "
                                   f"would write into a parameter, constant or input through "
                                   f"{key!r}; the module is refused")

    def code(self) -> str:
        """Readable text of the program for people (never executed)."""
        return graph_text(self.graph)


def _slots(value: Any) -> list[int]:
    if isinstance(value, Ref):
        return [value.slot]
    if isinstance(value, tuple):
        return [s for v in value for s in _slots(v)]
    return []


def _load(value: Any, env: list[Any]) -> Any:
    if type(value) is _Slot:
        return env[value.index]
    if type(value) is list:
        return [_load(v, env) for v in value]
    return value


def program_from_json(data: Any, *, name: str = "program", device: torch.device | None = None,
                      train: bool = True) -> Program:
    """Validate ``graft.graph/1`` (bytes, or already-parsed JSON) and build a ``Program``.

    Args:
        data: The program file's bytes, or its parsed JSON (as ``graft.save`` holds it).
        name: What to call the program in messages.
        device: Where tensors the graph creates are placed; ``None``: as recorded.
        train: Whether it is a train program (the only kind that may update buffers).

    Raises:
        FormatError / UnsafeContentError: the program is not valid (nothing is built).
    """
    if isinstance(data, (bytes, bytearray, str)):
        graph = read_graph(bytes(data) if not isinstance(data, str) else data.encode("utf-8"),
                           name=name, train=train)
    else:
        graph = graph_from_json(data, name=name, train=train)
    return Program(graph, name=name, device=device, train=train)
