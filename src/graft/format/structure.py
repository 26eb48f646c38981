"""The shape of what a signature returns: a small tree of containers over named outputs.

A program returns a flat list of tensors; the source model may have returned a tuple, a list,
a dict or a ``ModelOutput`` holding them. The signature records that nesting as plain JSON so
a call can hand back the same structure, without pickling a tree spec or naming a class::

    "logits"                                   one tensor (an output name)
    null                                       None
    {"tuple": [tree, ...]}                     a tuple
    {"list": [tree, ...]}                      a list
    {"dict": [["key", tree], ...]}             a dict, in insertion order
    {"record": [["key", tree], ...]}           a ModelOutput-style record (dict + attributes)

Every output name appears exactly once among the leaves, and the nesting is bounded.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Sequence

from graft.errors import FormatError

__all__ = ["CONTAINERS", "MAX_DEPTH", "OUTPUT_NAME", "check_structure", "structure_leaves"]

#: Container tags: sequences hold a list of trees, mappings a list of [key, tree] pairs.
CONTAINERS = {"tuple": "sequence", "list": "sequence", "dict": "mapping", "record": "mapping"}
#: Deeper nesting than this is refused (hostile manifests must not recurse without bound).
MAX_DEPTH = 16
#: Output names: an identifier, optionally followed by dotted parts (``hidden_states.0``).
OUTPUT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def structure_leaves(tree: Any) -> list[str]:
    """The output names at the leaves of a (checked) structure, in order."""
    return [leaf for leaf in _walk(tree, 0) if leaf is not None]


def _walk(tree: Any, depth: int) -> Iterator[str | None]:
    if depth > MAX_DEPTH:
        raise FormatError(f"output structure is nested deeper than {MAX_DEPTH} levels")
    if tree is None or isinstance(tree, str):
        yield tree
        return
    if not isinstance(tree, dict) or len(tree) != 1:
        raise FormatError(f"output structure node {tree!r:.200} is not an output name, null "
                          f"or one of {sorted(CONTAINERS)}")
    ((tag, body),) = tree.items()
    kind = CONTAINERS.get(tag)
    if kind is None or not isinstance(body, list):
        raise FormatError(f"output structure node {tag!r:.100} is not one of "
                          f"{sorted(CONTAINERS)} over a list")
    if kind == "sequence":
        for child in body:
            yield from _walk(child, depth + 1)
        return
    keys = set()
    for pair in body:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                and _KEY.fullmatch(pair[0])):
            raise FormatError(f"output structure {tag} entry {pair!r:.200} must be "
                              "[key, tree] with a key of letters, digits, '_', '.', '-'")
        if pair[0] in keys:
            raise FormatError(f"output structure {tag} has the key {pair[0]!r} twice")
        keys.add(pair[0])
        yield from _walk(pair[1], depth + 1)


def check_structure(tree: Any, outputs: Sequence[str]) -> Any:
    """Validate ``tree`` against the signature's output names and return it.

    Raises:
        FormatError: a node is malformed, the nesting is too deep, or the leaves are not the
            output names each exactly once.
    """
    leaves = structure_leaves(tree)
    if sorted(leaves) != sorted(outputs) or len(set(leaves)) != len(leaves):
        raise FormatError(f"output structure names {leaves[:20]} but the signature's outputs "
                          f"are {list(outputs)[:20]}; each output must appear exactly once")
    return tree
