"""The strict JSON reader's nesting guard against an independent reference: the parsed value's
own depth, counted by walking it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graft.errors import FormatError
from graft.format import jsonio
from graft.format.limits import MAX_JSON_DEPTH


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


# Text that looks like JSON structure: brackets, quotes and backslashes inside strings must
# not count as nesting, however they are escaped.
_TEXT = st.text(alphabet='[]{}"\\ab,:/\u00e9', max_size=12)
_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | _TEXT,
                       lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(_TEXT, inner, max_size=3), max_leaves=30)


def _nest(value: Any, levels: int) -> Any:
    for i in range(levels):
        value = [value] if i % 2 else {"k[{": value}
    return value


@settings(max_examples=300, deadline=None)
@given(_VALUES, st.integers(0, MAX_JSON_DEPTH + 3), st.booleans())
def test_the_nesting_guard_agrees_with_the_parsed_depth(value, levels, ascii_only):
    doc = _nest(value, levels)
    raw = json.dumps(doc, ensure_ascii=ascii_only).encode()
    assert jsonio._too_deep(raw) == (_depth(doc) > MAX_JSON_DEPTH)
    if _depth(doc) > MAX_JSON_DEPTH:
        with pytest.raises(FormatError, match="deeper than"):
            jsonio.loads(raw, what="doc")
    else:
        assert jsonio.loads(raw, what="doc") == doc


@pytest.mark.parametrize("raw", [b'{"a": "unterminated [[[', b'["\\"" ' + b"[" * 200,
                                 b"]" * 5 + b"[" * 5, b'"' * 3 + b"{" * 100])
def test_malformed_text_is_refused_either_way(raw):
    with pytest.raises(FormatError):
        jsonio.loads(raw, what="doc")
