"""Encoding an exported program's graph as ``graft.graph`` JSON (the writer's side).

The reader and the closed operator list both sides share live in ``graft.format.graph``;
this file only turns a ``torch.export.ExportedProgram`` into plain JSON values, and refuses
at save time any operator a reader would refuse at load time.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.fx

from graft.errors import FormatError
from graft.format.graph import GRAPH_FORMAT, NAME
from graft.format.operators import operator_list
from graft.runtime.program import PY_TARGETS

__all__ = ["program_to_json"]

_PY_NAMES = {v: k for k, v in PY_TARGETS.items()}
# Tracing-time checks that pin the device the author exported on; inputs are checked
# against the signature instead.
# ``_assert_scalar`` carries a free-text message (not storable as a pure operator argument);
# the size guards it states are recorded as the signature's dimension bounds instead.
_DROPPED = {"aten._assert_tensor_metadata.default", "aten._assert_scalar.default",
            "aten.sym_constrain_range_for_size.default"}


def _target_name(target: Any, node: str) -> str:
    if isinstance(target, torch._ops.OpOverload):
        name = f"{target.namespace}.{target._opname}.{target._overloadname}"
        if name not in operator_list() and name not in _DROPPED:
            raise FormatError(f"node '{node}' calls {name}, which is not in Graft's operator "
                              f"list for {GRAPH_FORMAT} (graft/format/operators.json); a "
                              "module may only call listed pure tensor operators. If this "
                              "operator is pure, the list is missing it: please report it")
        return name
    if target in _PY_NAMES:
        return _PY_NAMES[target]
    raise FormatError(f"node '{node}' calls {target!r}, which a module cannot store (control "
                      "flow, higher-order or custom Python functions are not supported by "
                      f"{GRAPH_FORMAT}); rewrite the signature's method without it")


def _encode(value: Any, node: str, names: Mapping[str, str] | None = None) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, torch.fx.Node):
        return {"ref": (names or {}).get(value.name, value.name)}
    if isinstance(value, (list, tuple)):
        return [_encode(v, node, names) for v in value]
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": value.type}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"slice": [_encode(v, node) for v in (value.start, value.stop, value.step)]}
    raise FormatError(f"node '{node}' has an argument of type {type(value).__name__} "
                      f"({value!r}) that {GRAPH_FORMAT} cannot store")


def program_to_json(ep: torch.export.ExportedProgram, strip_prefix: str = "",
                    input_names: Sequence[str] = ()) -> dict[str, Any]:
    """Encode an exported program's graph as ``graft.graph/1`` JSON (no tensors inside).

    Args:
        ep: The exported program.
        strip_prefix: Removed from parameter and buffer names (the export wrapper's prefix).
        input_names: Names for the user inputs, in order (the signature's input names).
    """
    from torch.export.graph_signature import InputKind, OutputKind

    kinds = {InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer",
             InputKind.CONSTANT_TENSOR: "constant", InputKind.USER_INPUT: "input"}

    def fqn(target: str | None) -> str | None:
        return target.removeprefix(strip_prefix) if target is not None else None

    inputs = []
    # Placeholders are named after what they hold: p_<param>, b_<buffer>, or the input's name.
    names: dict[str, str] = {}
    taken = {n.name for n in ep.graph.nodes if n.op != "placeholder"}
    user_names = iter(input_names)
    for spec in ep.graph_signature.input_specs:
        if spec.kind not in kinds:
            raise FormatError(f"exported input {spec.arg.name} is a {spec.kind.name}, which "
                              f"{GRAPH_FORMAT} cannot store")
        kind = kinds[spec.kind]
        if kind == "input":
            names[spec.arg.name] = next(user_names, spec.arg.name)
        else:
            names[spec.arg.name] = kind[0] + "_" + fqn(spec.target).replace(".", "_")
        # Names are data to the reader, which accepts identifiers only; fx's own placeholder
        # name always is one.
        if names[spec.arg.name] in taken or not NAME.fullmatch(names[spec.arg.name]):
            names[spec.arg.name] = spec.arg.name
        taken.add(names[spec.arg.name])
        inputs.append({"name": names[spec.arg.name], "kind": kind,
                       **({"target": fqn(spec.target)} if kind != "input" else {})})
    nodes = []
    graph_outputs: Sequence[Any] = ()
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            graph_outputs = node.args[0]
            continue
        if node.op != "call_function":
            raise FormatError(f"exported graph has a '{node.op}' node ({node.name}); only "
                              "operator calls can be stored")
        target = _target_name(node.target, node.name)
        if target in _DROPPED and not node.users:
            continue
        nodes.append({"name": node.name, "target": target,
                      "args": _encode(list(node.args), node.name, names),
                      "kwargs": {k: _encode(v, node.name, names) for k, v in node.kwargs.items()}})
    outputs = []
    for spec, value in zip(ep.graph_signature.output_specs, graph_outputs, strict=True):
        if spec.kind == OutputKind.USER_OUTPUT:
            outputs.append({"kind": "output", "value": _encode(value, "output", names)})
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            outputs.append({"kind": "buffer_mutation", "target": fqn(spec.target),
                            "value": _encode(value, "output", names)})
        else:
            raise FormatError(f"the signature's method mutates {spec.target!r} "
                              f"({spec.kind.name}); a signature may not change its inputs")
    return {"format": GRAPH_FORMAT, "inputs": inputs, "nodes": nodes, "outputs": outputs}
