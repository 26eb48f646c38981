"""Flattening what a model returns into named tensor outputs and a structure to rebuild it.

A program returns a flat tuple of tensors. Models return tensors, tuples, lists, dicts and
``transformers`` ``ModelOutput`` records, nested (``hidden_states`` is a tuple inside a
record). Flattening names each tensor by its path (``last_hidden_state``, ``hidden_states.0``)
and records the nesting as plain data (``format/structure.py``) so the loaded module returns
the same structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from graft.errors import FormatError
from graft.format.structure import MAX_DEPTH, OUTPUT_NAME

__all__ = ["FlatOutputs", "flatten_outputs", "flat_values"]


@dataclass(frozen=True)
class FlatOutputs:
    """A model's outputs, flattened.

    Args:
        names: One name per tensor, in the order the program returns them.
        structure: The ``format/structure.py`` tree over ``names``.
    """

    names: list[str]
    structure: Any


def _is_record(value: Any) -> bool:
    # transformers' ModelOutput is an OrderedDict subclass with fields as attributes; any
    # such record is stored the same way, without naming its class.
    return isinstance(value, Mapping) and hasattr(value, "to_tuple")


def flat_values(value: Any) -> list[torch.Tensor]:
    """The tensors in ``value``, in the order ``flatten_outputs`` names them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if value is None:
        return []
    if isinstance(value, (tuple, list)):
        return [t for child in value for t in flat_values(child)]
    if isinstance(value, Mapping):
        return [t for child in value.values() for t in flat_values(child)]
    return [value]  # refused by flatten_outputs, which runs first


def flatten_outputs(key: str, method: str, value: Any,
                    names: Sequence[str] | None = None) -> FlatOutputs:
    """Name every tensor in ``value`` and record how they nest.

    Args:
        key: The signature's name, for messages.
        method: The model's method, for messages.
        value: What the method returned.
        names: Names the user gives the tensors, in order; ``None``: named by path (a bare
            tensor is ``output``; the items of a returned tuple ``output_0``, ...; a dict's
            or record's fields by their keys; nested items ``field.0``, ``field.key``).

    Raises:
        FormatError: an output is not a tensor, a key cannot name an output, or ``names``
            does not name every tensor.
    """
    paths: list[str] = []

    def walk(item: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise FormatError(f"signature {key!r}: {method} returns outputs nested deeper "
                              f"than {MAX_DEPTH} levels")
        if isinstance(item, torch.Tensor):
            paths.append(path)
            return path
        if item is None:
            return None
        if isinstance(item, (tuple, list)):
            tag = "tuple" if isinstance(item, tuple) else "list"
            prefix = f"{path}." if depth else "output_"
            return {tag: [walk(child, f"{prefix}{i}", depth + 1)
                          for i, child in enumerate(item)]}
        if isinstance(item, Mapping):
            pairs = []
            for field, child in item.items():
                part = str(field)
                if not isinstance(field, str) or not OUTPUT_NAME.fullmatch(part) or "." in part:
                    raise FormatError(f"signature {key!r}: {method} returns a dict key "
                                      f"{field!r:.80} that cannot name an output; name the "
                                      "outputs with Signature(outputs=[...])")
                pairs.append([part, walk(child, f"{path}.{part}" if depth else part,
                                         depth + 1)])
            return {"record" if _is_record(item) else "dict": pairs}
        where = f" at {path!r}" if depth else ""
        raise FormatError(f"signature {key!r}: {method} returns a {type(item).__name__}"
                          f"{where}; outputs must be tensors (or tuples, lists and dicts of "
                          "them)")

    structure = walk(value, "output", 0)
    if not paths:
        raise FormatError(f"signature {key!r}: {method} returns no tensor")
    if names is None:
        return FlatOutputs(paths, structure)
    names = list(names)
    if len(names) != len(paths):
        raise FormatError(f"signature {key!r} names {len(names)} outputs but {method} returns "
                          f"{len(paths)} tensors ({paths[:8]})")
    for name in names:
        if not isinstance(name, str) or not OUTPUT_NAME.fullmatch(name):
            raise FormatError(f"signature {key!r}: output name {name!r} must be an identifier "
                              "(dotted parts allowed: 'hidden_states.0')")
    if len(set(names)) != len(names):
        raise FormatError(f"signature {key!r}: output names {names} repeat a name")
    renamed = dict(zip(paths, names))
    return FlatOutputs(names, _rename(structure, renamed))


def _rename(tree: Any, renamed: Mapping[str, str]) -> Any:
    if tree is None or isinstance(tree, str):
        return None if tree is None else renamed[tree]
    ((tag, body),) = tree.items()
    if tag in ("tuple", "list"):
        return {tag: [_rename(child, renamed) for child in body]}
    return {tag: [[k, _rename(child, renamed)] for k, child in body]}
