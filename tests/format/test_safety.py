"""Every byte of a module is checked; saving is atomic.

That loading never unpickles or executes module content is shown by the audit-hook corpus in
``tests/format/test_hostile.py`` (it replaced tests here that checked a marker file a payload
would have created: nothing in the load path unpickled, so those could not fail).
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import zipfile
import pickle
from pathlib import Path

import pytest
import torch

import graft
from graft.errors import FormatError, IntegrityError, PathExists, UnsafeContentError
from graft._fs import sha256_file
from graft.format.entries import FileEntry
from graft.format.manifest import Manifest
from tests.conftest import TinyCNN


@pytest.fixture
def module_dir(tiny_cnn, images, tmp_path) -> Path:
    path = tmp_path / "m"
    graft.save(tiny_cnn, path, name="tiny-cnn", version="1.0.0", example_inputs=(images,),
               assets={"labels.txt": "a\nb\nc\nd\n"})
    return path


def _replace_file(directory: Path, rel: str, data: bytes) -> None:
    """Tamper like a careful attacker: change a file AND make the manifest consistent."""
    (directory / rel).parent.mkdir(parents=True, exist_ok=True)
    (directory / rel).write_bytes(data)
    manifest = Manifest.read(directory)
    files = dict(manifest.files)
    files[rel] = FileEntry(sha256_file(directory / rel), len(data))
    _write_manifest(directory, dataclasses.replace(manifest, files=files))


def _write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / "graft.json").unlink()
    manifest.write(directory)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_tampered_weights_raise_integrity_error(module_dir, damage):
    path = module_dir / "weights.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
    else:
        data = data[:-100]
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="weights.safetensors"):
        graft.load(module_dir)


def test_malformed_safetensors_header_is_a_format_error(module_dir):
    _replace_file(module_dir, "weights.safetensors", b"\xff" * 8 + b"{not json")
    with pytest.raises(FormatError, match="safetensors"):
        graft.load(module_dir)


def test_unknown_format_version_is_refused(module_dir):
    data = json.loads((module_dir / "graft.json").read_text())
    data["format"] = "graft.module/99"
    (module_dir / "graft.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match="graft.module/99"):
        graft.load(module_dir)


@pytest.mark.parametrize("rel", ["../outside.txt", "/etc/passwd", "assets/../../x", "a\\..\\b"])
def test_paths_escaping_the_module_are_refused(module_dir, rel):
    data = json.loads((module_dir / "graft.json").read_text())
    data["files"][rel] = {"sha256": "0" * 64, "size": 1}
    (module_dir / "graft.json").write_text(json.dumps(data))
    with pytest.raises(UnsafeContentError, match="escapes"):
        graft.load(module_dir)


def test_symlinked_asset_is_refused(module_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("a\nb\nc\nd\n")
    (module_dir / "assets/labels.txt").unlink()
    (module_dir / "assets/labels.txt").symlink_to(secret)
    with pytest.raises(UnsafeContentError, match="link"):
        graft.load(module_dir)


def test_save_refuses_pickle_asset_and_writes_nothing(tiny_cnn, images, tmp_path):
    with pytest.raises(UnsafeContentError):
        graft.save(tiny_cnn, tmp_path / "m", name="t", version="1", example_inputs=(images,),
                   assets={"model.pkl": pickle.dumps({"a": 1})})
    assert list(tmp_path.iterdir()) == []


def test_save_over_existing_path_is_refused_and_keeps_it(module_dir, tiny_cnn, images):
    before = _snapshot(module_dir)
    with pytest.raises(PathExists):
        graft.save(tiny_cnn, module_dir, name="tiny-cnn", version="2.0.0",
                   example_inputs=(images,))
    assert _snapshot(module_dir) == before


def test_failed_export_leaves_nothing_behind(images, tmp_path):
    class Broken(TinyCNN):
        def features(self, images):
            if images.sum() > 0:  # Python control flow on tensor data cannot be exported
                return images.mean()
            return super().features(images)

    with pytest.raises(FormatError, match="cannot be exported"):
        graft.save(Broken(), tmp_path / "m", name="b", version="1",
                   signatures={"features": graft.Signature("features", example_inputs=(images,))})
    assert list(tmp_path.iterdir()) == []


# SIGKILL during save, at each named step (no timed kills): tests/hub/test_kill_points.py.


def test_text_that_merely_looks_like_an_opcode_is_accepted(tiny_cnn, images, tmp_path):
    graft.save(tiny_cnn, tmp_path / "m", name="t", version="1", example_inputs=(images,),
               assets={"labels.txt": "cat\ndog\nother\n"})
    assert graft.load(tmp_path / "m").asset_path("labels.txt").read_text() == "cat\ndog\nother\n"


# -- the pickle rule, file by file (format/files.py, format/tensorfile.py) --------------------


class _Calls:
    def __reduce__(self):
        return (print, ("never",))


@pytest.mark.parametrize("data", [
    pickle.dumps(_Calls(), protocol=0),
    pickle.dumps(_Calls(), protocol=0)[:-1],  # no STOP: the unpickler calls before it fails
    pickle.dumps(_Calls(), protocol=1),
    b"I1\n0" + pickle.dumps(_Calls(), protocol=0),  # starts with INT, POP
    b"F2.5\n0" + pickle.dumps(_Calls(), protocol=0),  # starts with FLOAT
    pickle.dumps(["benign"], protocol=0) + pickle.dumps(_Calls(), protocol=0),
    b"cos\nsystem\n.",  # a complete pickle that imports
    pickle.dumps(_Calls(), protocol=4),
])
def test_pickle_streams_are_refused_whatever_opcode_they_start_with(data):
    from graft.format.files import refuse_code_or_pickle

    with pytest.raises(UnsafeContentError, match="pickle"):
        refuse_code_or_pickle("assets/labels.txt", data)


@pytest.mark.parametrize("text", [
    b"cat\ndog\nother\n", b"cat\ndog\n", b"(cat)\n", b"I love it\n", b"N/A\nS\n", b"0\n1\n2\n",
    b'{"model": {}}', b"", pickle.dumps([1, "plain data"], protocol=0),
])
def test_text_and_plain_data_are_accepted(text):
    from graft.format.files import refuse_code_or_pickle

    refuse_code_or_pickle("assets/labels.txt", text)


def test_a_declared_huge_opcode_argument_allocates_nothing(tmp_path):
    """BINUNICODE8 declaring 2^60 bytes: the scan reads what the file holds, no more."""
    from graft.format.files import check_file

    path = tmp_path / "x.txt"
    path.write_bytes(b"\x8d" + struct.pack("<Q", 1 << 60) + b"abc")
    check_file(path, "assets/x.txt")  # decodes nothing complete: accepted, quickly


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("data", [
    _zip({"a.txt": b"x" * (3 << 20), "model/data.pkl": b"\x80\x02N."}),  # past any prefix
    _zip({"weights": pickle.dumps(1, protocol=2)}),  # a pickle under a plain name
    _zip({"pytorch_model.bin": b"x"}),
    b"prefix bytes " + _zip({"m/data.pkl": b"x"}),  # a zip that does not start the file
    _zip({"m/data.pkl": b"x"})[:60],  # only a local header: no central directory at all
])
def test_zip_archives_holding_pickles_are_refused(data, tmp_path):
    from graft.format.files import check_file, refuse_code_or_pickle

    with pytest.raises(UnsafeContentError, match="zip"):
        refuse_code_or_pickle("assets/archive.zip", data)
    (tmp_path / "archive.zip").write_bytes(data)
    with pytest.raises(UnsafeContentError, match="zip"):
        check_file(tmp_path / "archive.zip", "assets/archive.zip")


def test_a_zip_of_plain_data_is_accepted():
    from graft.format.files import refuse_code_or_pickle

    refuse_code_or_pickle("assets/vocab.zip", _zip({"vocab.txt": b"a\nb\n"}))


def _header(tensors: dict, data: bytes, metadata: dict | None = None) -> bytes:
    header = dict(tensors)
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def test_a_real_safetensors_file_passes_the_structural_check(tmp_path):
    from safetensors.torch import save_file

    from graft.format.tensorfile import read_safetensors_header

    save_file({"a": torch.zeros(3, 2), "b": torch.arange(5), "c": torch.ones(0)},
              str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    header = read_safetensors_header(tmp_path / "w.safetensors")
    assert header.tensors["a"].shape == (3, 2) and header.tensors["b"].dtype == "int64"
    assert header.metadata == {"format": "pt"}


@pytest.mark.parametrize("data, match", [
    (_header({"a": F32x2}, b"\0" * 12), "trailing bytes"),
    (_header({"a": F32x2, "b": {**F32x2, "data_offsets": [12, 20]}}, b"\0" * 20), "hole"),
    (_header({"a": F32x2, "b": F32x2}, b"\0" * 8), "overlap"),
    (_header({"a": {**F32x2, "shape": [3]}}, b"\0" * 8), "needs 12 bytes"),
    (_header({"a": {**F32x2, "dtype": "C64"}}, b"\0" * 8), "dtype"),
    (_header({"a": {**F32x2, "shape": [2, -1]}}, b"\0" * 8), "shape"),
    (_header({"a": {**F32x2, "shape": [True, 2]}}, b"\0" * 8), "shape"),
    (_header({"a": {**F32x2, "shape": [10**6] * 3}}, b"\0" * 8), "elements"),
    (_header({"a": {**F32x2, "extra": 1}}, b"\0" * 8), "exactly the keys"),
    (_header({"a": F32x2}, b"\0" * 8, metadata={"n": 1}), "__metadata__"),
    (_header({"a": F32x2}, b"\0" * 8)[:-9], "past the end"),
    (struct.pack("<Q", 10**12) + b"{}", "over the limit"),
    (b"\x80\x04\x95", "shorter than"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    (struct.pack("<Q", 13) + b'{"a":1,"a":2}', "twice"),
])
def test_a_malformed_safetensors_file_is_refused_before_safetensors_reads_it(data, match):
    from graft.format.tensorfile import parse_safetensors_header

    with pytest.raises(FormatError, match=match):
        parse_safetensors_header(data, len(data), what="w.safetensors")
