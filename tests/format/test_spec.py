"""Tensor and signature specs: one written form per spec, impossible specs refused."""

from __future__ import annotations

import pytest

from graft.errors import FormatError
from graft.format import limits
from graft.format.spec import ImagePreprocess, SignatureSpec, TensorSpec, TextPreprocess


@pytest.mark.parametrize("text, dtype, shape", [
    ("float32[batch,3,224,224]", "float32", ("batch", 3, 224, 224)),
    ("int64[batch, seq]", "int64", ("batch", "seq")),
    ("float32[]", "float32", ()),
    ("float32[batch,2*seq]", "float32", ("batch", "2*seq")),
    ("bool[007]", "bool", (7,)),
])
def test_parse_and_round_trip(text, dtype, shape):
    spec = TensorSpec.parse(text)
    assert (spec.dtype, spec.shape) == (dtype, shape)
    assert TensorSpec.parse(str(spec)) == spec
    assert TensorSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("text, match", [
    ("float32[batch,-3]", "negative"),
    ("float32[batch,3]\n", "malformed"),
    ("\nfloat32[batch,3]", "malformed"),
    ("float32[batch,\u0663]", "not an identifier"),       # a Unicode digit is not a size
    ("float32[batch,\u00b2]", "not an identifier"),
    ("float32[ba tch]", "not an identifier"),
    ("float32[batch,,3]", "not an identifier"),
    ("float32[[3]]", "malformed"),
    ("float32[" + "9" * 30 + "]", "digits"),
    ("float32[" + ",".join(["2"] * (limits.MAX_TENSOR_RANK + 1)) + "]", "at most"),
    ("float32[100000,100000,100000]", "elements"),
    ("complex64[3]", "unknown"),
    ("float32[" + "x" * (limits.MAX_NAME_CHARS + 1) + "]", "not an identifier"),
])
def test_malformed_or_impossible_specs_are_refused(text, match):
    with pytest.raises(FormatError, match=match):
        TensorSpec.parse(text)


@pytest.mark.parametrize("shape", [("3",), (" batch",), (True,), (3.0,), (-1,), ("",)])
def test_specs_built_in_python_must_have_one_written_form(shape):
    """``("3",)`` would print as ``float32[3]`` and read back as the int 3: refused."""
    with pytest.raises(FormatError):
        TensorSpec("float32", shape)


def _signature(**overrides):
    fields = dict(inputs={"images": "float32[batch,3,8,8]"}, outputs={"y": "float32[batch]"},
                  programs={"eval": "programs/f.eval.json"})
    fields.update(overrides)
    return SignatureSpec(**fields)


@pytest.mark.parametrize("overrides", [
    {"dims": {"batch": (4, 2)}},
    {"dims": {"batch": (-1, None)}},
    {"dims": {"batch": (1.5, None)}},
    {"dims": {"batch": (1, True)}},
    {"dims": {"bad name": (1, 2)}},
    {"programs": {"eval": "programs/../f.json"}},
    {"programs": {"eval": "programs/f.eval.json", "jit": "programs/f.jit.json"}},
    {"inputs": {}},
    {"inputs": {"images\n": "float32[batch]"}},
    {"description": 3},
    {"preprocess": TextPreprocess("assets/tokenizer.json", 16)},  # text needs two inputs
    {"preprocess": {"kind": "image"}},
])
def test_impossible_signatures_are_refused(overrides):
    with pytest.raises(FormatError):
        _signature(**overrides)


@pytest.mark.parametrize("kwargs", [
    dict(size=100000, resize=100000),
    dict(size=16, resize=limits.MAX_IMAGE_SIDE + 1),
    dict(size=16, resize=18, mean=("0.5", "0.5", "0.5")),
    dict(size=16, resize=18, mean=(float("nan"), 0.5, 0.5)),
    dict(size=16, resize=18, std=(float("inf"), 1.0, 1.0)),
    dict(size=16, resize=18, interpolation="lanczos"),
    dict(size=True, resize=18),
])
def test_absurd_image_preprocessing_is_refused(kwargs):
    fields = dict(size=16, resize=18, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    fields.update(kwargs)
    with pytest.raises(FormatError):
        ImagePreprocess(**fields)


@pytest.mark.parametrize("tokenizer, max_length", [
    ("assets/tokenizer.json", 10**9),
    ("assets/tokenizer.json", 0),
    ("assets/tokenizer.json", True),
    ("assets/../tokenizer.json", 16),
    ("tokenizer.json", 16),
    (3, 16),
])
def test_absurd_text_preprocessing_is_refused(tokenizer, max_length):
    with pytest.raises(FormatError):
        TextPreprocess(tokenizer, max_length)


def test_the_largest_documented_values_are_accepted():
    ImagePreprocess(limits.MAX_IMAGE_SIDE, limits.MAX_IMAGE_SIDE, (0, 0, 0), (1, 1, 1))
    TextPreprocess("assets/tokenizer.json", limits.MAX_TEXT_MAX_LENGTH)
    spec = _signature(dims={"batch": (0, limits.MAX_DIM_SIZE)})
    assert SignatureSpec.from_json(spec.to_json()) == spec
