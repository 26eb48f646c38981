"""Rebuilding what a signature returns from its program's flat outputs.

The manifest records the nesting as data (``format/structure.py``); this file turns it back
into tuples, lists, dicts and ``Outputs`` records. No class is named or imported from the
manifest: a ``ModelOutput`` comes back as Graft's own ``Outputs``.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["Outputs", "build_outputs"]


class Outputs(dict):
    """A ``ModelOutput``-style record: a dict whose fields also read as attributes.

    ``out.logits``, ``out["logits"]`` and ``out[0]`` (the first field) all work, as they do on
    a ``transformers`` output; ``to_tuple()`` gives the fields in order.
    """

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"these outputs have no field {key!r}; they have "
                                 f"{list(self)}") from None

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple[Any, ...]:
        """The fields' values, in order."""
        return tuple(self.values())

    def __repr__(self) -> str:
        return f"Outputs({dict.__repr__(self)})"


def build_outputs(structure: Any, values: Mapping[str, Any]) -> Any:
    """Nest ``values`` (output name -> tensor) the way ``structure`` says.

    ``structure`` was validated when the manifest was read (known tags, bounded depth, each
    output exactly once), so this only walks it.
    """
    if structure is None or isinstance(structure, str):
        return None if structure is None else values[structure]
    ((tag, body),) = structure.items()
    if tag == "tuple":
        return tuple(build_outputs(child, values) for child in body)
    if tag == "list":
        return [build_outputs(child, values) for child in body]
    pairs = ((key, build_outputs(child, values)) for key, child in body)
    return dict(pairs) if tag == "dict" else Outputs(pairs)
