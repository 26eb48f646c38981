"""Strict JSON for untrusted bytes: one reading only, bounded work.

``json.loads`` accepts things two readers may interpret differently or that cost unbounded
work: duplicate keys (the last one wins in Python, the first in other readers), ``NaN`` and
``Infinity`` (not JSON), numbers that do not survive the reading (``1e400`` becomes infinity,
``0.10000000000000001`` becomes the same double as ``0.1``), integers wider than 64 bits
(other readers round or wrap them; Python's own digit limit raises a bare ``ValueError`` deep
inside), unpaired UTF-16 surrogates (``"\\ud800"``, which no UTF-8 writer can write back), and
nesting deep enough to exhaust the stack. This reader refuses all of them with a
``FormatError`` that names what was read.

What it accepts therefore has one meaning, and that meaning is written back exactly by a
canonical JSON writer: every number's decimal value equals the shortest form of the double
(or the int64) it was read as. This is what makes a digest over canonical JSON identify what
every reader sees.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

from graft.errors import FormatError
from graft.format.limits import MAX_INT, MAX_INT_DIGITS, MAX_JSON_DEPTH

__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "loads"]

#: Deepest nesting of arrays and objects accepted (kept for callers; see ``limits``).
MAX_DEPTH = MAX_JSON_DEPTH


class _Refused(Exception):
    """Raised inside the parser's hooks; turned into a FormatError with the file's name."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # in C; a repeated key shows as a shorter dict
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"the key {key!r} appears twice in one object")
            seen.add(key)
    return out


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _integer(text: str) -> int:
    if len(text) < 19:  # up to 18 digits always fits in 64 bits (and in the digit limit)
        return int(text)
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(text)} digits exceeds the {MAX_INT_DIGITS}-digit "
                       "limit")
    value = int(text)
    if not -MAX_INT - 1 <= value <= MAX_INT:
        raise _Refused(f"the integer {text} does not fit in 64 bits")
    return value


def _float(text: str) -> float:
    value = float(text)
    # The literal must denote exactly the number the shortest form of the double denotes:
    # otherwise a reader that keeps decimals and one that keeps doubles see different values
    # under one canonical form (and 1e400 would silently become infinity).
    if value != value or value in (float("inf"), float("-inf")):
        raise _Refused(f"the number {text[:40]} is out of the range of a double")
    if Decimal(text) != Decimal(repr(value)):
        raise _Refused(f"the number {text[:40]} cannot be read without changing its value "
                       f"(it reads as {value!r}); write it as {value!r}")
    return value


# A JSON string, written as an unrolled loop (runs of plain characters, then one escape):
# several times faster than an alternation tried at every character.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
# What bytes.translate deletes to leave only the structure
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_NOT_BRACKETS_OR_QUOTES = bytes(sorted(set(range(256)) - set(b'[]{}"')))
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_EMPTY_PAIR = re.compile(rb"\[\]|\{\}")


def _too_deep(data: bytes) -> bool:
    """Whether brackets outside strings nest deeper than ``MAX_JSON_DEPTH``, at C speed.

    Each pass removes the innermost empty pairs, so balanced brackets of depth ``d`` vanish
    in ``d`` passes. Unbalanced ones stop shrinking and are left to the parser to refuse.
    """
    if b"\\" in data:
        brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    else:
        # Without escapes every quote delimits a string: keep only brackets and quotes, then
        # every other piece between quotes is outside strings. C-speed, where the regex over
        # each string took a third of reading a 70 KB graft.json.
        skeleton = data.translate(None, _NOT_BRACKETS_OR_QUOTES)
        brackets = b"".join(skeleton.split(b'"')[::2])
    for _ in range(MAX_JSON_DEPTH):
        reduced = _EMPTY_PAIR.sub(b"", brackets)
        if not reduced or len(reduced) == len(brackets):
            return False
        brackets = reduced
    return True


def _check_strings(value: Any) -> None:
    """Refuse unpaired surrogates anywhere in a parsed value (keys included)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise _Refused(f"the string {item[:40]!r} holds an unpaired UTF-16 surrogate, "
                               "which is not Unicode text") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def loads(data: bytes | str, *, what: str, max_bytes: int | None = None) -> Any:
    """Parse untrusted JSON strictly.

    Args:
        data: UTF-8 bytes (or text).
        what: What is being read, for the message (``"graft.json"``, ``"program features"``).
        max_bytes: Refuse input longer than this many bytes (UTF-8).

    Raises:
        FormatError: the bytes are not UTF-8 JSON, or are JSON that this reader refuses.
    """
    try:
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    except UnicodeEncodeError:
        raise FormatError(f"{what} is not valid Unicode text (it holds an unpaired "
                          "surrogate); the file is corrupt or hostile") from None
    if max_bytes is not None and len(raw) > max_bytes:
        raise FormatError(f"{what} is {len(raw)} bytes, over the limit of {max_bytes}; "
                          "the file is corrupt or hostile")
    if _too_deep(raw):
        raise FormatError(f"{what} nests arrays or objects deeper than {MAX_JSON_DEPTH} levels; "
                          "the file is corrupt or hostile")
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_pairs,
                           parse_constant=_constant, parse_int=_integer, parse_float=_float)
        if _SURROGATE_ESCAPE.search(raw):
            _check_strings(value)
        return value
    except _Refused as exc:
        raise FormatError(f"{what} is refused: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise FormatError(f"{what} is not valid UTF-8 JSON ({exc}); the file is corrupt or "
                          "not what it claims to be") from None
