"""Strict readers for the fields of untrusted JSON: one type, one meaning, bounded size.

A manifest field that parses but has the wrong type must be refused, never coerced:
``bool("no")`` is ``True``, ``True`` is an ``int`` in Python, and a float where an int is
expected rounds. Objects must hold exactly the keys the format defines, so that nothing a
reader ignores can change what another reader sees under the same digest.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from graft.errors import FormatError, UnsafeContentError
from graft.format.limits import MAX_NAME_CHARS, MAX_PATH_CHARS, MAX_TEXT_CHARS

__all__ = ["check_relative_path", "expect_bool", "expect_identifier", "expect_int",
           "expect_list", "expect_object", "expect_string"]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
# One path component: ASCII letters, digits and a few punctuation marks; not "." or "..".
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@+=,-]*", re.ASCII)


def expect_object(value: Any, what: str, *, required: Collection[str] = (),
                  optional: Collection[str] = ()) -> Mapping[str, Any]:
    """``value`` as a JSON object with all ``required`` keys (each named once) and no key
    outside both sets."""
    # type() first: isinstance against an abstract class is slow, and a manifest has an
    # object per tensor
    if type(value) is not dict and not isinstance(value, Mapping):
        raise FormatError(f"{what} must be a JSON object, got {_show(value)}")
    for key in required:
        if key not in value:
            missing = sorted(k for k in required if k not in value)
            raise FormatError(f"{what} is missing {missing}")
    if len(value) == len(required):
        return value  # exactly the required keys (``required`` names each once)
    unknown = sorted(set(value) - set(required) - set(optional))
    if unknown:
        raise FormatError(f"{what} has unknown keys {[_show(k) for k in unknown[:5]]}; it "
                          f"takes {sorted({*required, *optional})} (put free-form data in the "
                          "manifest's metadata)")
    return value


def expect_list(value: Any, what: str, *, max_items: int) -> list[Any]:
    """``value`` as a JSON array of at most ``max_items``."""
    if not isinstance(value, (list, tuple)):
        raise FormatError(f"{what} must be a JSON array, got {_show(value)}")
    if len(value) > max_items:
        raise FormatError(f"{what} has {len(value)} entries, over the limit of {max_items}")
    return list(value)


def expect_string(value: Any, what: str, *, max_chars: int = MAX_TEXT_CHARS) -> str:
    """``value`` as a string of at most ``max_chars`` characters."""
    if not isinstance(value, str):
        raise FormatError(f"{what} must be a string, got {_show(value)}")
    if len(value) > max_chars:
        raise FormatError(f"{what} is {len(value)} characters, over the limit of {max_chars}")
    return value


def expect_identifier(value: Any, what: str) -> str:
    """``value`` as an ASCII identifier (``images``, ``input_ids``) of bounded length."""
    if (not isinstance(value, str) or len(value) > MAX_NAME_CHARS
            or not _IDENTIFIER.fullmatch(value)):
        raise FormatError(f"{what} {_show(value)} is not an identifier (ASCII letters, digits "
                          f"and '_', not starting with a digit, at most {MAX_NAME_CHARS} "
                          "characters)")
    return value


def expect_int(value: Any, what: str, *, low: int, high: int) -> int:
    """``value`` as an int (never a bool or a float) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{what} must be an integer, got {_show(value)}")
    if not low <= value <= high:
        raise FormatError(f"{what} is {value}; it must be between {low} and {high}")
    return value


def expect_bool(value: Any, what: str) -> bool:
    """``value`` as a JSON boolean: ``"no"``, ``0`` and ``null`` are refused, not coerced."""
    if not isinstance(value, bool):
        raise FormatError(f"{what} must be true or false, got {_show(value)}")
    return value


def check_relative_path(rel: Any) -> str:
    """Refuse a module-relative path that could escape the module folder or is not plain.

    A path is ASCII components joined by ``/``; each starts with a letter, digit or ``_``
    (so never ``.``, ``..`` or a hidden file), with no backslash, NUL, control character or
    space anywhere.

    Raises:
        UnsafeContentError: the path escapes, is absolute, or is not a plain relative path.
    """
    if not isinstance(rel, str):
        raise FormatError(f"a path in the module must be a string, got {_show(rel)}")
    # Every component must match _COMPONENT, which cannot be empty, "." or "..": that alone
    # refuses absolute paths, "a//b", "a/./b", a trailing "/" and every escape.
    if len(rel) > MAX_PATH_CHARS or not all(_COMPONENT.fullmatch(p) for p in rel.split("/")):
        raise UnsafeContentError(f"path {_show(rel)} in the module escapes the module folder or "
                                 "is not a plain relative POSIX path (ASCII letters, digits and "
                                 "._@+=,- in each part, at most "
                                 f"{MAX_PATH_CHARS} characters); modules may only name files "
                                 "inside themselves")
    return rel


def _show(value: Any) -> str:
    """A short, printable rendering of an untrusted value for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
