"""Fuzzing the two readers of untrusted module bytes: graft.json and programs.

Seeded with the real manifest and programs of a saved tiny module, Hypothesis mutates them
at the byte level (flips, cuts, insertions, splices of JSON-significant bytes) and at the
JSON level (any value replaced by any other, keys duplicated, nesting added), and the readers
must either accept the input or refuse it with one of Graft's own errors: no ``KeyError``,
``RecursionError``, ``UnicodeError`` or other bare exception, ever. An accepted manifest must
also round-trip through its canonical form to the same bytes (one digest, one meaning).

The runs are bounded (``max_examples``) and derandomized, so the suite is deterministic; set
``GRAFT_FUZZ_EXAMPLES`` to run longer locally.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graft
from graft.errors import GraftError
from graft.format.graph import read_graph
from graft.format.manifest import Manifest
from tests.conftest import TinyCNN, TinyTransformer

EXAMPLES = int(os.environ.get("GRAFT_FUZZ_EXAMPLES", "250"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[bytes]]:
    """Real graft.json and program bytes: a CNN (batch norm, three variants) and a text
    encoder (embedding, attention, dims bounds)."""
    root = tmp_path_factory.mktemp("seeds")
    torch.manual_seed(0)
    graft.save(TinyCNN(), root / "cnn", name="tiny-cnn", version="1.0.0",
               example_inputs=(torch.randn(2, 3, 16, 16),), assets={"labels.txt": "a\nb\n"},
               description="seed", metadata={"k": [1, 2.5, None, "x"]})
    ids = torch.randint(1, 50, (2, 5))
    graft.save(TinyTransformer(), root / "text", name="tiny-text", version="2",
               signatures={"embed": graft.Signature("forward",
                                                    example_inputs=(ids, torch.ones_like(ids)))})
    out: dict[str, list[bytes]] = {"manifest": [], "program": []}
    for module in ("cnn", "text"):
        out["manifest"].append((root / module / "graft.json").read_bytes())
        programs = sorted((root / module).glob("programs/*.json"))
        out["program"].extend(p.read_bytes() for p in programs)
    return out


# -- strategies ----------------------------------------------------------------------------

_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["", "eval", "train", "assets/labels.txt", "../x", "float32[batch,3]",
                     "aten.add.Tensor", "builtins.exec", "parameter", "input", "ref", "\n",
                     "sha256:" + "0" * 64, "0" * 64, "x=__import__('os')"]))
_JSON = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside parsed JSON (the root included)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


def _replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, *rest = path
    if isinstance(value, dict):
        return {k: (_replaced(v, tuple(rest), new) if k == head else v) for k, v in value.items()}
    return [(_replaced(v, tuple(rest), new) if i == head else v) for i, v in enumerate(value)]


@st.composite
def _json_mutation(draw: st.DrawFn, seed: bytes) -> bytes:
    """The seed with one value replaced, a key duplicated, or a value nested deeper."""
    parsed = json.loads(seed)
    paths = _paths(parsed)
    path = paths[draw(st.integers(0, len(paths) - 1))]
    how = draw(st.sampled_from(["replace", "duplicate", "nest", "drop"]))
    if how == "replace":
        mutated = _replaced(parsed, path, draw(_JSON))
    elif how == "nest":
        depth = draw(st.integers(1, 200))
        inner = json.dumps(_pick(parsed, path))
        text = json.dumps(_replaced(parsed, path, "\0MARK\0"))
        return text.replace('"\\u0000MARK\\u0000"', "[" * depth + inner + "]" * depth).encode()
    elif how == "drop" and path:
        parent = _pick(parsed, path[:-1])
        mutated = _replaced(parsed, path[:-1], (
            {k: v for k, v in parent.items() if k != path[-1]} if isinstance(parent, dict)
            else [v for i, v in enumerate(parent) if i != path[-1]]))
    else:
        text = json.dumps(parsed)
        # Repeat the first key of some object: two readers would disagree on its value.
        at = draw(st.integers(0, max(0, text.count("{") - 1)))
        pos = -1
        for _ in range(at + 1):
            pos = text.find("{", pos + 1)
        close = text.find(",", pos)
        if pos < 0 or close < 0:
            return text.encode()
        return (text[:close] + "," + text[pos + 1:close] + text[close:]).encode()
    return json.dumps(mutated, allow_nan=True).encode()


def _pick(value: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        value = value[key]
    return value


@st.composite
def _byte_mutation(draw: st.DrawFn, seed: bytes) -> bytes:
    """The seed with a few bytes flipped, cut, inserted or spliced."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if how == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif how == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif how == "insert":
            data[at:at] = draw(st.one_of(
                st.binary(max_size=8),
                st.sampled_from([b"[", b"{", b'"', b"\\", b",", b"NaN", b"1e999", b"\\ud800",
                                 b'"a":1,"a":2', b"\xff", b"\x80\x04", b"9" * 40])))
        else:
            del data[at:]
    return bytes(data)


def _mutation(seed: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(_json_mutation(seed), _byte_mutation(seed))


# -- targets -------------------------------------------------------------------------------


def _read_manifest(raw: bytes) -> None:
    try:
        manifest = Manifest.from_bytes(raw)
    except GraftError:
        return
    canonical = manifest.canonical()
    again = Manifest.from_bytes(canonical)
    assert again == manifest and again.canonical() == canonical


@FUZZ
@given(data=st.data())
def test_manifest_reader_raises_only_graft_errors(seeds, data):
    seed = data.draw(st.sampled_from(seeds["manifest"]))
    _read_manifest(data.draw(_mutation(seed)))


@FUZZ
@given(data=st.data())
def test_program_reader_raises_only_graft_errors(seeds, data):
    seed = data.draw(st.sampled_from(seeds["program"]))
    raw = data.draw(_mutation(seed))
    try:
        read_graph(raw, name="programs/fuzz.json", train=data.draw(st.booleans()))
    except GraftError:
        pass


def test_the_seeds_are_accepted(seeds):
    """The mutations start from inputs the readers accept, so refusals are the mutation's."""
    for raw in seeds["manifest"]:
        _read_manifest(raw)
        Manifest.from_bytes(raw)
    for raw in seeds["program"]:
        read_graph(raw, name="programs/seed.json")


def test_the_mutations_reach_past_the_json_parser(seeds):
    """A fuzz target that only ever hits the JSON parser would test nothing else: check that
    the mutations produce parseable JSON that the field checks then refuse."""
    from graft.format import jsonio

    parsed = refused = 0

    @settings(max_examples=100, deadline=None, derandomize=True, database=None)
    @given(raw=_json_mutation(seeds["manifest"][0]))
    def probe(raw: bytes) -> None:
        nonlocal parsed, refused
        try:
            jsonio.loads(raw, what="probe")
        except GraftError:
            return
        parsed += 1
        try:
            Manifest.from_bytes(raw)
        except GraftError:
            refused += 1

    probe()
    assert parsed > 20 and refused > 10, (parsed, refused)
