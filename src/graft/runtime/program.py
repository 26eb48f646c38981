"""Programs: torch.export graphs stored as plain JSON (``graft.graph/1``) and run eagerly.

A program is the ATen graph of one signature in one variant (``eval`` or ``train``). It is
stored without weights: its inputs name the module's parameters and buffers by their
fully-qualified names, and the runtime passes the module's own tensor objects in. That is what
lets every signature and both variants share one set of weights.

Reading a program never unpickles and never imports anything: each node's target is looked up
in a fixed allow-list (ATen and prims operators, a few ``operator`` functions on sizes), and
arguments are plain JSON values or tagged objects for dtypes, devices and node references.
torch's own serializer is not used because its reader builds fake tensors for every node
(~1 s for EfficientNet-Lite0) and its archive format may pickle; this format is documented in
docs/format.md.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx

from graft.errors import FormatError, UnsafeContentError

__all__ = ["GRAPH_FORMAT", "OP_NAMESPACES", "PY_TARGETS", "Program", "program_from_json"]

GRAPH_FORMAT = "graft.graph/1"

OP_NAMESPACES = ("aten", "prims")
# Python-level functions that torch.export emits on symbolic sizes; nothing else is callable.
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
_LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo}
_MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "preserve_format": torch.preserve_format,
}
_INPUT_KINDS = {"parameter", "buffer", "constant", "input"}


@dataclass(frozen=True)
class Binding:
    """One graph input or output: what it is and which module tensor it names."""

    kind: str
    target: str | None = None


def _resolve_target(name: Any) -> Callable[..., Any]:
    if not isinstance(name, str):
        raise FormatError(f"program node target must be a string, got {name!r}")
    if name in PY_TARGETS:
        return PY_TARGETS[name]
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in OP_NAMESPACES:
        raise UnsafeContentError(f"program calls {name!r}, which is not an ATen or prims "
                                 "operator; the module is refused because running it could "
                                 "execute code")
    namespace, op, overload = parts
    try:
        return getattr(getattr(getattr(torch.ops, namespace), op), overload)
    except (AttributeError, RuntimeError):
        raise FormatError(f"program calls {name}, which this PyTorch ({torch.__version__}) "
                          "does not have; the module needs a newer PyTorch") from None


def _decode(value: Any, nodes: Mapping[str, torch.fx.Node],
            device: torch.device | None = None) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(v, nodes, device) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        ((tag, body),) = value.items()
        if tag == "ref":
            if body not in nodes:
                raise FormatError(f"program refers to node {body!r} before defining it")
            return nodes[body]
        if tag == "float" and body in ("inf", "-inf", "nan"):
            return float(body)
        if tag == "dtype" and isinstance(getattr(torch, str(body), None), torch.dtype):
            return getattr(torch, body)
        if tag == "device" and body in ("cpu", "cuda", "mps", "meta"):
            # Tensors a program creates go where the module's weights are, not where the
            # author happened to export it.
            return device if device is not None else torch.device(body)
        if tag == "layout" and body in _LAYOUTS:
            return _LAYOUTS[body]
        if tag == "memory_format" and body in _MEMORY_FORMATS:
            return _MEMORY_FORMATS[body]
        if tag == "slice" and isinstance(body, list) and len(body) == 3:
            return slice(*(_decode(v, nodes, device) for v in body))
    raise FormatError(f"program argument {value!r} is not a valid {GRAPH_FORMAT} value")


class Program:
    """A runnable program: an FX graph module plus how its inputs and outputs bind.

    Calling it runs the graph eagerly, op by op (``self.graph_module.code`` shows the Python
    it runs, and a debugger steps through it).
    """

    def __init__(self, graph_module: torch.fx.GraphModule, inputs: list[Binding],
                 outputs: list[Binding]) -> None:
        self.graph_module = graph_module
        self.inputs = inputs
        self.outputs = outputs
        self.num_user_inputs = sum(b.kind == "input" for b in inputs)

    def __call__(self, state: Mapping[str, torch.Tensor], constants: Mapping[str, torch.Tensor],
                 user_inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run the graph over ``state`` (module tensors by name) and the user's inputs."""
        args: list[torch.Tensor] = []
        feed = iter(user_inputs)
        for binding in self.inputs:
            if binding.kind == "input":
                args.append(next(feed))
            elif binding.kind == "constant":
                args.append(constants[binding.target])
            else:
                args.append(state[binding.target])
        results = self.graph_module(*args)
        outputs = []
        for binding, value in zip(self.outputs, results, strict=True):
            if binding.kind == "output":
                outputs.append(value)
            else:
                with torch.no_grad():
                    state[binding.target].copy_(value)
        return outputs


def program_from_json(data: Any, *, name: str = "program",
                      device: torch.device | None = None) -> Program:
    """Build a runnable ``Program`` from ``graft.graph/1`` JSON (parsed or bytes).

    Args:
        device: Where tensors the graph creates (``arange``, ``zeros``...) are placed;
            ``None``: the device recorded at export.
    """
    if isinstance(data, (bytes, str)):
        try:
            data = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"program {name} is not {GRAPH_FORMAT} JSON ({exc}); the module "
                              "is corrupt, or holds a file of another kind (refused)") from None
    if not isinstance(data, dict) or data.get("format") != GRAPH_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise FormatError(f"program {name} has format {found!r}; this Graft reads "
                          f"{GRAPH_FORMAT!r}")
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    bindings: list[Binding] = []
    try:
        for entry in data["inputs"]:
            if entry["kind"] not in _INPUT_KINDS:
                raise FormatError(f"program {name} input kind {entry['kind']!r} is unknown")
            if entry["name"] in env:
                raise FormatError(f"program {name} defines {entry['name']!r} twice")
            env[entry["name"]] = graph.placeholder(entry["name"])
            bindings.append(Binding(entry["kind"], entry.get("target")))
            if entry["kind"] != "input" and not isinstance(entry.get("target"), str):
                raise FormatError(f"program {name} input {entry['name']!r} names no tensor")
        for entry in data["nodes"]:
            if entry["name"] in env:
                raise FormatError(f"program {name} defines {entry['name']!r} twice")
            target = _resolve_target(entry["target"])
            node = graph.create_node("call_function", target,
                                     tuple(_decode(entry["args"], env, device)),
                                     {k: _decode(v, env, device)
                                      for k, v in entry["kwargs"].items()},
                                     name=entry["name"])
            env[entry["name"]] = node
        outputs = []
        out_bindings = []
        for entry in data["outputs"]:
            if entry["kind"] not in ("output", "buffer_mutation"):
                raise FormatError(f"program {name} output kind {entry['kind']!r} is unknown")
            outputs.append(_decode(entry["value"], env, device))
            out_bindings.append(Binding(entry["kind"], entry.get("target")))
        graph.output(tuple(outputs))
    except (KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"program {name} is malformed ({exc!r})") from None
    class_name = "".join(c if c.isalnum() else "_" for c in name)
    module = torch.fx.GraphModule(torch.nn.Module(), graph, class_name=class_name)
    return Program(module, bindings, out_bindings)
