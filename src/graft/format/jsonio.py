"""Strict JSON for untrusted bytes: one reading only, bounded work.

``json.loads`` accepts things two readers may interpret differently or that cost unbounded
work: duplicate keys (the last one wins in Python, the first in other readers), ``NaN`` and
``Infinity`` (not JSON), integers of any length (Python's own digit limit raises a bare
``ValueError`` deep inside), and nesting deep enough to exhaust the stack. This reader refuses
all of them with a ``FormatError`` that names what was read.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

from graft.errors import FormatError

__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "loads"]

#: Deepest nesting of arrays and objects accepted (programs nest a few levels; manifests four).
MAX_DEPTH = 64
#: Longest integer literal accepted, in digits (int64 needs 19).
MAX_INT_DIGITS = 20


class _Refused(Exception):
    """Raised inside the parser's hooks; turned into a FormatError with the file's name."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(text)} digits exceeds the {MAX_INT_DIGITS}-digit "
                       "limit")
    return int(text)


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")


def _depth(data: bytes) -> int:
    """The deepest bracket nesting, counted outside strings, at regex speed."""
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", data))
    steps = (1 if c in b"[{" else -1 for c in brackets)
    return max(itertools.accumulate(steps, initial=0))


def loads(data: bytes | str, *, what: str, max_bytes: int | None = None) -> Any:
    """Parse untrusted JSON strictly.

    Args:
        data: UTF-8 bytes (or text).
        what: What is being read, for the message (``"graft.json"``, ``"program features"``).
        max_bytes: Refuse input longer than this.

    Raises:
        FormatError: the bytes are not UTF-8 JSON, or are JSON that this reader refuses.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise FormatError(f"{what} is {len(data)} bytes, over the limit of {max_bytes}; "
                          "the file is corrupt or hostile")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if _depth(raw) > MAX_DEPTH:
        raise FormatError(f"{what} nests arrays or objects deeper than {MAX_DEPTH} levels; "
                          "the file is corrupt or hostile")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant,
                          parse_int=_integer)
    except _Refused as exc:
        raise FormatError(f"{what} is refused: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise FormatError(f"{what} is not valid UTF-8 JSON ({exc}); the file is corrupt or "
                          "not what it claims to be") from None
