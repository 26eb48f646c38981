"""graft.json: strict reading, one meaning per digest, canonical round trips."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from graft.errors import FormatError, IntegrityError, ModuleNotFound, UnsafeContentError
from graft.format import limits
from graft.format.entries import FileEntry, Parent, TensorEntry
from graft.format.manifest import Manifest, canonical_json
from graft.format.spec import ImagePreprocess, SignatureSpec, TextPreprocess

HEX = "ab" * 32


def _manifest(**overrides: Any) -> Manifest:
    image = SignatureSpec(inputs={"images": "float32[batch,3,16,16]"},
                          outputs={"logits": "float32[batch,4]"},
                          programs={"eval": "programs/forward.eval.json",
                                    "train": "programs/forward.train.json"},
                          preprocess=ImagePreprocess(16, 18, (0.485, 0.456, 0.406),
                                                     (0.229, 0.224, 0.225)),
                          description="logits", dims={"batch": (1, None)})
    text = SignatureSpec(inputs={"input_ids": "int64[batch,seq]",
                                 "attention_mask": "int64[batch,seq]"},
                         outputs={"states": "float32[batch,seq,2*seq]"},
                         programs={"eval": "programs/embed.eval.json"},
                         preprocess=TextPreprocess("assets/tokenizer.json", 128),
                         dims={"seq": (1, 512)})
    fields: dict[str, Any] = dict(
        name="tiny-cnn", version="1.0.0-rc.1", default_signature="forward",
        signatures={"forward": image, "embed": text},
        files={rel: FileEntry(HEX, 10) for rel in (
            "programs/forward.eval.json", "programs/forward.train.json",
            "programs/embed.eval.json", "weights.safetensors", "assets/tokenizer.json")},
        tensors={"conv1.weight": TensorEntry("parameter", "float32", (8, 3, 3, 3), HEX),
                 "bn1.num_batches_tracked": TensorEntry("buffer", "int64", (), HEX)},
        description="A tiny CNN.", license="MIT",
        parents=(Parent("base@1.0.0", "sha256:" + HEX),),
        metadata={"source": {"weights": "pkg==0.1.0"}, "scores": [0.5, 1, None, True]})
    fields.update(overrides)
    return Manifest(**fields)


def _data() -> dict[str, Any]:
    return json.loads(_manifest().canonical())


def _read(data: Any) -> Manifest:
    return Manifest.from_bytes(json.dumps(data).encode())


# -- round trips ---------------------------------------------------------------------------


def test_canonical_form_round_trips():
    manifest = _manifest()
    assert Manifest.from_json(manifest.to_json()) == manifest
    again = Manifest.from_bytes(manifest.canonical())
    assert again.canonical() == manifest.canonical() and again.digest == manifest.digest
    # The digest is over the canonical form: a pretty-printed file has the same identity.
    pretty = json.dumps(manifest.to_json(), indent=3).encode()
    assert Manifest.from_bytes(pretty).digest == manifest.digest


def test_written_file_reads_back_identically(tmp_path):
    manifest = _manifest()
    manifest.write(tmp_path)
    assert Manifest.read(tmp_path) == manifest
    assert Manifest.read(tmp_path).digest == manifest.digest


def test_metadata_tuples_become_lists_so_the_round_trip_is_exact():
    manifest = _manifest(metadata={"pair": (1, 2)})
    assert manifest.metadata == {"pair": [1, 2]}
    assert Manifest.from_json(manifest.to_json()) == manifest


@pytest.mark.parametrize("text", [
    "line one\nline two",
    "\x1b[31mred\x1b[0m and a bell \x07",
    "forged\nsha256:" + "0" * 64 + "  other-module@1.0.0",
    "tab\tand\rcarriage return, unicode \u2028 separator, emoji \U0001F600, NUL \x00",
])
def test_free_text_with_control_characters_keeps_the_digest_sound(text):
    manifest = _manifest(description=text, license=text, metadata={"label": text})
    again = Manifest.from_bytes(manifest.canonical())
    assert again.description == text and again.license == text
    assert again.digest == manifest.digest
    # Control characters are escaped in the canonical bytes: one line, nothing a terminal
    # could interpret if the manifest itself is printed.
    canonical = manifest.canonical()
    assert b"\n" not in canonical and b"\x1b" not in canonical and b"\x00" not in canonical
    # Two manifests that differ only in such text never share a digest.
    assert _manifest(description=text + " ").digest != manifest.digest


# -- JSON that is not what it seems ---------------------------------------------------------


@pytest.mark.parametrize("raw", [
    # duplicate keys: the top level, inside a file entry, inside a signature
    b'{"name": "a", "name": "b"}',
    json.dumps(_data()).replace('"size": 10', '"size": 10, "size": 11', 1).encode(),
    json.dumps(_data()).replace('"description": "logits"',
                                '"description": "logits", "description": "x"', 1).encode(),
])
def test_duplicate_keys_are_refused(raw):
    with pytest.raises(FormatError, match="twice"):
        Manifest.from_bytes(raw)


@pytest.mark.parametrize("value, match", [
    ("NaN", "not a JSON number"),
    ("-Infinity", "not a JSON number"),
    ("1e400", "range of a double"),
    ("0.10000000000000001", "without changing its value"),
    ("1" * 30, "digit limit"),
    ("9223372036854775808", "64 bits"),
    ("[" * 100 + "]" * 100, "deeper than"),
    ('"\\ud800"', "surrogate"),
])
def test_numbers_and_strings_with_two_readings_are_refused(value, match):
    raw = json.dumps(_data()).replace('"scores": [', f'"scores": [{value}, ', 1).encode()
    with pytest.raises(FormatError, match=match):
        Manifest.from_bytes(raw)


def _set(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    *parents, last = path.split("/")
    node: Any = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


_DELETE = object()
FILE = "files/weights.safetensors"
IMAGE = "signatures/forward/preprocess"
TEXT = "signatures/embed/preprocess"


@pytest.mark.parametrize("path, value", [
    # types that parse but are wrong; bool() and int() would coerce them
    ("fine_tuning/trainable", "no"),
    ("fine_tuning/trainable", 0),
    ("fine_tuning/trainable", None),
    ("fine_tuning/batch_norm", ["update"]),
    (f"{FILE}/size", True),
    (f"{FILE}/size", "10"),
    (f"{FILE}/size", 10.0),
    (f"{FILE}/size", -1),
    (f"{FILE}/sha256", HEX.upper()),
    (f"{FILE}/sha256", HEX + "\n"),
    ("tensors/conv1.weight/shape", [8, 3, 3, True]),
    ("tensors/conv1.weight/shape", [8, "3", 3, 3]),
    ("tensors/conv1.weight/shape", [8, -3, 3, 3]),
    ("tensors/conv1.weight/shape", [10**6, 10**6]),
    ("tensors/conv1.weight/shape", [1] * 40),
    ("tensors/conv1.weight/dtype", "complex64"),
    ("tensors/conv1.weight/kind", "weight"),
    ("description", 5),
    ("license", None),
    ("metadata", []),
    ("parents", {"handle": "a"}),
    ("parents/0/handle", "base 1.0"),
    ("parents/0/handle", "base@1\n"),
    ("parents/0/digest", "sha256:" + "g" * 64),
    ("default_signature", "missing"),
    ("default_signature", 3),
    # names and versions: fullmatch, ASCII
    ("name", "tiny-cnn\n"),
    ("name", "Tiny"),
    ("name", ""),
    ("version", "1.0.0\n"),
    ("version", "\u0661.0"),
    ("version", "1.0.0-"),
    # impossible specs
    ("signatures/forward/inputs/0/spec", "float32[batch,-3]"),
    ("signatures/forward/inputs/0/spec", "float32[batch,3]\n"),
    ("signatures/forward/inputs/0/spec", "float32[batch,\u0663]"),
    ("signatures/forward/inputs/0/spec", "float32[batch,3,16,16,x y]"),
    ("signatures/forward/inputs/0/spec", "float33[batch]"),
    ("signatures/forward/inputs/0/spec", "float32[100000,100000,100000]"),
    ("signatures/forward/inputs/0/spec", 5),
    ("signatures/forward/inputs/0/name", "images\n"),
    ("signatures/forward/inputs/0/name", 7),
    ("signatures/forward/outputs", []),
    ("signatures/forward/dims/batch", {"min": 5, "max": 2}),
    ("signatures/forward/dims/batch", {"min": -1, "max": None}),
    ("signatures/forward/dims/batch", {"min": True, "max": None}),
    ("signatures/forward/dims/batch", {"min": 1, "max": "8"}),
    ("signatures/forward/dims/batch", {"min": 1}),
    ("signatures/forward/dims/batch", [1, 8]),
    ("signatures/forward/programs/debug", "programs/forward.eval.json"),
    ("signatures/forward/programs/eval", "weights.safetensors"),
    ("signatures/forward/programs", {"train": "programs/forward.train.json"}),
    ("signatures/forward/description", ["x"]),
    # absurd or mistyped preprocessing
    (f"{IMAGE}/size", 100000),
    (f"{IMAGE}/resize", 100000),
    (f"{IMAGE}/size", 0),
    (f"{IMAGE}/size", 16.0),
    (f"{IMAGE}/resize", 8),
    (f"{IMAGE}/mean", ["0.5", "0.5", "0.5"]),
    (f"{IMAGE}/mean", [0.5, 0.5]),
    (f"{IMAGE}/mean", [True, 0.5, 0.5]),
    (f"{IMAGE}/std", [0.0, 0.5, 0.5]),
    (f"{IMAGE}/std", "0.5"),
    (f"{IMAGE}/interpolation", "lanczos"),
    (f"{IMAGE}/interpolation", 2),
    (f"{IMAGE}/kind", "audio"),
    (f"{IMAGE}/kind", _DELETE),
    (f"{TEXT}/max_length", 10**9),
    (f"{TEXT}/max_length", 0),
    (f"{TEXT}/max_length", "128"),
    (f"{TEXT}/tokenizer", "tokenizer.json"),
    (f"{TEXT}/tokenizer", "assets/../../etc/passwd"),
    (f"{TEXT}/tokenizer", "assets/missing.json"),
    # unknown keys anywhere: a reader that ignored them would share a digest with one that
    # did not
    ("extra", {"anything": 1}),
    (f"{FILE}/mode", "0755"),
    ("signatures/forward/entrypoint", "x"),
    (f"{IMAGE}/antialias", True),
    ("fine_tuning/lr", 0.1),
    ("parents/0/note", "x"),
    ("tensors/conv1.weight/offset", 0),
    # names that would become attributes or paths
    ("signatures/bad name", _data()["signatures"]["forward"]),
    ("signatures/forward\n", _data()["signatures"]["forward"]),
    ("tensors/__class__", {"kind": "parameter", "dtype": "float32", "shape": [1],
                           "sha256": HEX}),
    ("tensors/conv1..weight", {"kind": "parameter", "dtype": "float32", "shape": [1],
                               "sha256": HEX}),
    ("files/graft.json", {"sha256": HEX, "size": 1}),
    # required fields
    ("files", _DELETE),
    ("signatures", _DELETE),
    ("format", "graft.module/2"),
])
def test_wrong_impossible_or_unknown_fields_are_refused(path, value):
    with pytest.raises(FormatError):
        _read(_set(_data(), path, value))


@pytest.mark.parametrize("rel", [
    "assets/a\x00b", "assets/.hidden", "assets/a b.txt", "assets\\x.txt", "../x", "/etc/x",
    "assets/../x", "./assets/x", "assets//x", "assets/x/", "~/x", "assets/\u00e9.txt",
    "a" * (limits.MAX_PATH_CHARS + 1),
])
def test_paths_that_are_not_plain_are_refused(rel):
    data = _data()
    data["files"][rel] = {"sha256": HEX, "size": 1}
    with pytest.raises(UnsafeContentError, match="plain relative"):
        _read(data)


def test_duplicate_input_names_are_refused():
    data = _data()
    inputs = data["signatures"]["embed"]["inputs"]
    inputs[1]["name"] = inputs[0]["name"]
    with pytest.raises(FormatError, match="listed twice"):
        _read(data)


def test_defaults_have_one_meaning():
    """Leaving out an optional field means exactly its documented default."""
    full = _data()
    sparse = _set(_set(_set(full, "description", _DELETE), "metadata", _DELETE), "parents",
                  _DELETE)
    assert _read(sparse).digest == _read(_set(_set(_set(full, "description", ""), "metadata",
                                                    {}), "parents", [])).digest


# -- files that are not files ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_fifo_graft_json_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "graft.json")
    with pytest.raises(UnsafeContentError, match="FIFO"):
        Manifest.read(tmp_path)


def test_a_directory_or_link_graft_json_is_refused(tmp_path):
    (tmp_path / "a" / "graft.json").mkdir(parents=True)
    with pytest.raises(UnsafeContentError, match="directory"):
        Manifest.read(tmp_path / "a")
    _manifest().write(tmp_path)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "graft.json").symlink_to(tmp_path / "graft.json")
    with pytest.raises(UnsafeContentError, match="link"):
        Manifest.read(tmp_path / "b")


def test_missing_and_oversized_graft_json(tmp_path):
    with pytest.raises(ModuleNotFound):
        Manifest.read(tmp_path)
    with open(tmp_path / "graft.json", "wb") as f:
        f.truncate(limits.MAX_MANIFEST_BYTES + 1)  # sparse: no memory or disk used
    with pytest.raises(FormatError, match="over the limit"):
        Manifest.read(tmp_path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hash_contents", [False, True])
def test_a_fifo_or_directory_listed_as_a_file_is_refused_without_blocking(tmp_path,
                                                                            hash_contents):
    ten = FileEntry(hashlib.sha256(b"0123456789").hexdigest(), 10)
    manifest = _manifest(files={**{rel: ten for rel in _manifest().files},
                                "assets/labels.txt": FileEntry(HEX, 0),
                                "assets/folder": FileEntry(HEX, 0)})
    for rel in manifest.files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel == "assets/labels.txt":
            os.mkfifo(tmp_path / rel)
        elif rel == "assets/folder":
            (tmp_path / rel).mkdir()
        else:
            (tmp_path / rel).write_bytes(b"0123456789")
    with pytest.raises(UnsafeContentError, match="FIFO|directory"):
        manifest.verify_files(tmp_path, hash_contents=hash_contents)


def test_verify_files_still_catches_altered_bytes(tmp_path):
    manifest = _manifest()
    for rel in manifest.files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"0123456789")
    manifest.verify_files(tmp_path, hash_contents=False)
    with pytest.raises(IntegrityError, match="sha256"):
        manifest.verify_files(tmp_path, hash_contents=True)


def test_canonical_json_refuses_what_json_cannot_hold():
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})
    with pytest.raises(FormatError):
        _manifest(metadata={"x": float("inf")})
    with pytest.raises(FormatError):
        _manifest(metadata={"x": {1, 2}})
    with pytest.raises(FormatError):
        _manifest(metadata={1: "int key"})
    with pytest.raises(FormatError):
        _manifest(metadata={"x": 2**70})


def test_python_built_manifests_are_checked_like_parsed_ones():
    with pytest.raises(FormatError):
        _manifest(files={"weights.safetensors": FileEntry(HEX, True)})
    with pytest.raises(FormatError):
        _manifest(tensors={"w": TensorEntry("parameter", "float32", (2, True), HEX)})
    from graft.format.entries import FineTuning

    with pytest.raises(FormatError):
        _manifest(fine_tuning=FineTuning(trainable="no"))  # type: ignore[arg-type]


def test_reading_is_bounded_for_a_large_valid_manifest():
    """Ten thousand files: the strict reader still takes the canonical bytes back exactly."""
    files = {f"assets/f{i}.txt": FileEntry(HEX, i) for i in range(10_000)}
    manifest = _manifest(files={**_manifest().files, **files})
    assert Manifest.from_bytes(manifest.canonical()).canonical() == manifest.canonical()


def test_paths_in_messages_are_short(tmp_path: Path):
    data = _data()
    data["files"]["x" * 5000] = {"sha256": HEX, "size": 1}
    with pytest.raises(UnsafeContentError) as info:
        _read(data)
    assert len(str(info.value)) < 600
