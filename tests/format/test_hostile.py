"""A hostile corpus, watched by an audit hook: no module runs code or reads outside itself.

Every case below is a module saved from a tiny model and then changed the way an attacker
would: the payload is put where a reader might execute or follow it, and the manifest's
digests are rewritten so that only the check that targets the payload can refuse it (sizes
and sha256 all match). Each module is loaded and called (eval and train), verified and added
to a store, with a PEP 578 audit hook recording, and each must be refused with the expected
error, while the hook sees no ``compile``, ``exec``, ``import``, ``pickle.find_class``,
process start or ``open`` outside the module's own directory (and the store's).

Audit hooks cannot be removed, so one hook is installed per test process; it records only
while a test holds it (``_watching``). ``test_the_hook_sees_what_it_must`` shows the hook
does see each of those events when they happen, so a pass here means something.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

import graft
from graft._fs import sha256_file
from graft.errors import DataError, FormatError, GraftError, UnsafeContentError
from graft.runtime.verify import verify_module
from tests.conftest import TinyCNN

#: Audit events that mean code from outside Graft's own source ran, or a process started.
CODE_EVENTS = frozenset({"compile", "exec", "import", "pickle.find_class", "os.system",
                         "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn",
                         "os.fork", "os.forkpty", "marshal.loads", "ctypes.dlopen"})


class _Recorder:
    """The process's one audit hook: records code events and opens outside allowed roots.

    Only the watching thread is recorded (other tests' leftover threads must not count);
    Graft's load, call, verify and add paths run on the caller's thread.
    """

    def __init__(self) -> None:
        self.active = False
        self.roots: tuple[str, ...] = ()
        self.events: list[tuple[str, str]] = []
        self.thread = 0

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        # Never raise and never open anything here: the hook runs inside the audited call.
        if not self.active or threading.get_ident() != self.thread:
            return
        if event in CODE_EVENTS:
            self.events.append((event, repr(args[:2])[:300]))
        elif event == "open":
            path, flags = args[0], args[2] if len(args) > 2 else 0
            if isinstance(path, int):
                return  # an already-open descriptor
            try:
                name = os.fsdecode(path)
                if not os.path.isabs(name):
                    # Relative to a directory descriptor (the event does not carry it): one
                    # component opened without following links cannot leave that directory,
                    # whose own open was checked by absolute path.
                    if ("/" in name or name in (".", "..")
                            or not (isinstance(flags, int) and flags & os.O_NOFOLLOW)):
                        self.events.append((event, name))
                    return
                real = os.path.realpath(name)
            except Exception:  # noqa: BLE001 - record what cannot be resolved
                self.events.append((event, repr(path)[:300]))
                return
            if not any(real == root or real.startswith(root + os.sep) for root in self.roots):
                self.events.append((event, real))


_RECORDER: _Recorder | None = None


def _recorder() -> _Recorder:
    global _RECORDER
    if _RECORDER is None:
        _RECORDER = _Recorder()
        sys.addaudithook(_RECORDER)
    return _RECORDER


@contextlib.contextmanager
def _watching(*roots: Path) -> Iterator[list[tuple[str, str]]]:
    """Record audit events of this thread while the block runs; yields the event list."""
    recorder = _recorder()
    recorder.roots = tuple(os.path.realpath(r) for r in roots)
    recorder.events = []
    recorder.thread = threading.get_ident()
    recorder.active = True
    try:
        yield recorder.events
    finally:
        recorder.active = False


# -- the base module and the operations ----------------------------------------------------

IMAGES = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def base_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "tiny"
    graft.save(TinyCNN(), path, name="tiny-cnn", version="1.0.0", example_inputs=(IMAGES,),
               assets={"labels.txt": "cat\ndog\nbird\nfish\n"})
    return path


#: Set when graft.load returned: a hostile module must be refused before that.
_LOADED: list[Path] = []


def _load_and_call(directory: Path, train: bool) -> None:
    module = graft.load(directory, trainable=train)
    _LOADED.append(directory)
    module.train(train)
    module(IMAGES)


OPERATIONS: dict[str, Callable[[Path, Path], Any]] = {
    "load-eval": lambda d, store: _load_and_call(d, train=False),
    "load-train": lambda d, store: _load_and_call(d, train=True),
    "verify": lambda d, store: verify_module(d),
    "add": lambda d, store: graft.Store(store).add(d),
}


@pytest.fixture(scope="module")
def warmed(base_module: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run every operation on the benign module once, so lazy imports happen before the hook
    records; then check that a benign run, recorded, sees nothing."""
    store = tmp_path_factory.mktemp("warm-store")
    for op in OPERATIONS.values():
        op(base_module, store)
    for op in OPERATIONS.values():
        store = tmp_path_factory.mktemp("warm-store")
        with _watching(base_module, store) as events:
            op(base_module, store)
        assert events == [], events
    return base_module


# -- tampering helpers -----------------------------------------------------------------------


def _manifest_data(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "graft.json").read_bytes())


def _write_manifest_data(directory: Path, data: dict[str, Any]) -> None:
    (directory / "graft.json").write_text(json.dumps(data, indent=1))


def _record(directory: Path, rel: str) -> None:
    """Make the manifest's entry for ``rel`` match the file now there (size and sha256)."""
    path = directory / rel
    data = _manifest_data(directory)
    if path.is_symlink() or not path.is_file():
        size, digest = 0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    else:
        size, digest = path.stat().st_size, sha256_file(path)
    data["files"][rel] = {"sha256": digest, "size": size}
    _write_manifest_data(directory, data)


def _replace(directory: Path, rel: str, content: bytes) -> None:
    path = directory / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    path.write_bytes(content)
    _record(directory, rel)


def _programs(directory: Path) -> list[str]:
    return sorted(f"programs/{p.name}" for p in (directory / "programs").glob("*.json"))


def _edit_programs(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``change`` to every program (so eval and train are both hostile)."""
    for rel in _programs(directory):
        graph = json.loads((directory / rel).read_bytes())
        change(graph)
        _replace(directory, rel, json.dumps(graph).encode())


def _rename_input(graph: dict[str, Any], new: str) -> None:
    entry = next(e for e in graph["inputs"] if e["kind"] == "input")
    old = entry["name"]
    entry["name"] = new
    text = json.dumps(graph).replace(json.dumps({"ref": old}), json.dumps({"ref": new}))
    graph.clear()
    graph.update(json.loads(text))


def _first_node(graph: dict[str, Any]) -> dict[str, Any]:
    return graph["nodes"][0]


class _Payload:
    """Unpickling this runs a shell command."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("true",))


CODE = "x=__import__('os').system('true')"


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _safetensors(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _zip_with_late_pickle() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("tiny/version", "3\n")
        archive.writestr("tiny/padding.txt", b"x" * (2 << 20))  # past any sniffed prefix
        archive.writestr("tiny/data.pkl", pickle.dumps(_Payload(), protocol=2))
    return buffer.getvalue()


# -- the corpus --------------------------------------------------------------------------------


def _case_input_name_code(d: Path, outside: Path) -> None:
    _edit_programs(d, lambda g: _rename_input(g, CODE))


def _case_kwargs_key_code(d: Path, outside: Path) -> None:
    _edit_programs(d, lambda g: _first_node(g)["kwargs"].update({CODE: 1}))


def _case_node_name_code(d: Path, outside: Path) -> None:
    def change(graph: dict[str, Any]) -> None:
        node = _first_node(graph)
        old, node["name"] = node["name"], "n; import os; os.system('true')"
        text = json.dumps(graph).replace(json.dumps({"ref": old}),
                                         json.dumps({"ref": node["name"]}))
        graph.clear()
        graph.update(json.loads(text))
    _edit_programs(d, change)


def _case_from_file(d: Path, outside: Path) -> None:
    def change(graph: dict[str, Any]) -> None:
        _first_node(graph).update(target="aten.from_file.default",
                                  args=[str(outside / "secret.txt"), True, 16], kwargs={})
    _edit_programs(d, change)


def _target(name: str) -> Callable[[Path, Path], None]:
    return lambda d, outside: _edit_programs(d, lambda g: _first_node(g).update(target=name))


def _case_inplace_on_parameter(d: Path, outside: Path) -> None:
    def change(graph: dict[str, Any]) -> None:
        weight = next(e["name"] for e in graph["inputs"] if e["kind"] == "parameter")
        _first_node(graph).update(target="aten.fill_.Scalar", args=[{"ref": weight}, 0.0],
                                  kwargs={})
    _edit_programs(d, change)


def _case_huge_int_literal(d: Path, outside: Path) -> None:
    for rel in _programs(d):
        text = (d / rel).read_text().replace("[1,1]", "[1" + "0" * 5000 + ",1]", 1)
        text = text.replace("[1, 1]", "[1" + "0" * 5000 + ", 1]", 1)
        _replace(d, rel, text.encode())


def _case_deep_program(d: Path, outside: Path) -> None:
    for rel in _programs(d):  # as text: Python's own json cannot even build this
        text = (d / rel).read_text()
        assert '"args":[' in text
        _replace(d, rel, text.replace('"args":[', '"args":[' + "[" * 5000 + "]" * 5000 + ",",
                                      1).encode())


def _case_program_is_pickle(d: Path, outside: Path) -> None:
    for rel in _programs(d):
        _replace(d, rel, pickle.dumps(_Payload()))


def _case_pickle_weights(d: Path, outside: Path) -> None:
    _replace(d, "weights.safetensors", pickle.dumps(_Payload(), protocol=4))


def _case_pickle_reference(d: Path, outside: Path) -> None:
    _replace(d, "reference/forward.safetensors", pickle.dumps(_Payload(), protocol=0))


def _case_pickle_named_safetensors_asset(d: Path, outside: Path) -> None:
    _replace(d, "assets/extra.safetensors", pickle.dumps(_Payload(), protocol=2))


def _case_pickle_asset(protocol: int, prefix: bytes = b"") -> Callable[[Path, Path], None]:
    return lambda d, outside: _replace(d, "assets/labels.txt",
                                       prefix + pickle.dumps(_Payload(), protocol=protocol))


def _case_zip_pickle_asset(d: Path, outside: Path) -> None:
    _replace(d, "assets/labels.txt", _zip_with_late_pickle())


def _case_huge_tensor_header(d: Path, outside: Path) -> None:
    _replace(d, "weights.safetensors", _safetensors(
        {"conv1.weight": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4]}},
        b"\0" * 4))


def _case_offsets_outside(d: Path, outside: Path) -> None:
    _replace(d, "weights.safetensors", _safetensors(
        {"conv1.weight": {"dtype": "F32", "shape": [2**20], "data_offsets": [0, 2**22]}},
        b"\0" * 16))


def _case_overlapping_tensors(d: Path, outside: Path) -> None:
    _replace(d, "weights.safetensors", _safetensors(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24))


def _manifest_text(change: Callable[[str], str]) -> Callable[[Path, Path], None]:
    def apply(d: Path, outside: Path) -> None:
        path = d / "graft.json"
        path.write_text(change(path.read_text()))
    return apply


def _case_trainable_no(d: Path, outside: Path) -> None:
    data = _manifest_data(d)
    data["fine_tuning"]["trainable"] = "no"
    _write_manifest_data(d, data)


def _case_unknown_manifest_key(d: Path, outside: Path) -> None:
    data = _manifest_data(d)
    data["entrypoint"] = "os.system"
    _write_manifest_data(d, data)


def _case_fifo_file(d: Path, outside: Path) -> None:
    (d / "assets/labels.txt").unlink()
    os.mkfifo(d / "assets/labels.txt")
    _record(d, "assets/labels.txt")


def _case_directory_file(d: Path, outside: Path) -> None:
    (d / "assets/labels.txt").unlink()
    (d / "assets/labels.txt").mkdir()
    _record(d, "assets/labels.txt")


def _case_symlink_out(d: Path, outside: Path) -> None:
    (d / "assets/labels.txt").unlink()
    (d / "assets/labels.txt").symlink_to(outside / "secret.txt")
    data = _manifest_data(d)
    data["files"]["assets/labels.txt"] = {"sha256": sha256_file(outside / "secret.txt"),
                                          "size": (outside / "secret.txt").stat().st_size}
    _write_manifest_data(d, data)


def _case_symlinked_folder(d: Path, outside: Path) -> None:
    shutil.rmtree(d / "assets")
    (outside / "assets").mkdir()
    (outside / "assets" / "labels.txt").write_text("cat\ndog\nbird\nfish\n")
    (d / "assets").symlink_to(outside / "assets")


def _case_path_escape(d: Path, outside: Path) -> None:
    data = _manifest_data(d)
    data["files"]["assets/../../outside/secret.txt"] = data["files"].pop("assets/labels.txt")
    _write_manifest_data(d, data)


def _case_manifest_fifo(d: Path, outside: Path) -> None:
    (d / "graft.json").unlink()
    os.mkfifo(d / "graft.json")


def _case_manifest_symlink(d: Path, outside: Path) -> None:
    shutil.move(d / "graft.json", outside / "graft.json")
    (d / "graft.json").symlink_to(outside / "graft.json")


def _case_tensor_dunder_name(d: Path, outside: Path) -> None:
    data = _manifest_data(d)
    data["tensors"]["__class__"] = data["tensors"].pop("conv1.weight")
    _write_manifest_data(d, data)


#: name -> (tamper, the error every operation must refuse it with)
CASES: dict[str, tuple[Callable[[Path, Path], None], type[Exception]]] = {
    "input-name-code": (_case_input_name_code, UnsafeContentError),
    "kwargs-key-code": (_case_kwargs_key_code, UnsafeContentError),
    "node-name-code": (_case_node_name_code, UnsafeContentError),
    "aten-from-file": (_case_from_file, UnsafeContentError),
    "target-prims-dict-setitem": (_target("prims.__dict__.__setitem__"), UnsafeContentError),
    "target-aten-class-init": (_target("aten.__class__.__init__"), UnsafeContentError),
    "target-builtins-exec": (_target("builtins.exec"), UnsafeContentError),
    "target-unlisted-aten": (_target("aten._foreach_add_.Scalar"), UnsafeContentError),
    "inplace-on-a-parameter": (_case_inplace_on_parameter, UnsafeContentError),
    "huge-int-literal": (_case_huge_int_literal, FormatError),
    "deeply-nested-program": (_case_deep_program, FormatError),
    "program-is-a-pickle": (_case_program_is_pickle, UnsafeContentError),
    "pickle-as-weights-safetensors": (_case_pickle_weights, FormatError),
    "pickle-as-reference-safetensors": (_case_pickle_reference, FormatError),
    "pickle-as-asset-safetensors": (_case_pickle_named_safetensors_asset, FormatError),
    "pickle-asset-protocol-0": (_case_pickle_asset(0), UnsafeContentError),
    "pickle-asset-protocol-2": (_case_pickle_asset(2), UnsafeContentError),
    "pickle-asset-float-opcode-first": (_case_pickle_asset(0, b"F1.5\n0"), UnsafeContentError),
    "pickle-asset-past-2mb-padding": (_case_pickle_asset(0, b"N0" * (1 << 20)),
                                      UnsafeContentError),
    "pickle-asset-after-benign-pickle": (_case_pickle_asset(0, pickle.dumps([1], protocol=0)),
                                         UnsafeContentError),
    "zip-with-late-pickle-entry": (_case_zip_pickle_asset, UnsafeContentError),
    "safetensors-declares-1e12-elements": (_case_huge_tensor_header, FormatError),
    "safetensors-offsets-outside-file": (_case_offsets_outside, FormatError),
    "safetensors-overlapping-tensors": (_case_overlapping_tensors, FormatError),
    "manifest-duplicate-key": (_manifest_text(
        lambda t: t.replace('"trainable": false', '"trainable": false, "trainable": true')),
        FormatError),
    "manifest-trainable-string": (_case_trainable_no, FormatError),
    "manifest-unknown-key": (_case_unknown_manifest_key, FormatError),
    "manifest-version-newline": (_manifest_text(
        lambda t: t.replace('"version": "1.0.0"', '"version": "1.0.0\\n"')), FormatError),
    "manifest-nan": (_manifest_text(
        lambda t: t.replace('"metadata": {}', '"metadata": {"x": NaN}')), FormatError),
    "manifest-lone-surrogate": (_manifest_text(
        lambda t: t.replace('"metadata": {}', '"metadata": {"x": "\\udc80"}')), FormatError),
    "manifest-is-a-fifo": (_case_manifest_fifo, UnsafeContentError),
    "manifest-is-a-symlink": (_case_manifest_symlink, UnsafeContentError),
    "manifest-tensor-named-dunder": (_case_tensor_dunder_name, FormatError),
    "fifo-as-listed-file": (_case_fifo_file, UnsafeContentError),
    "directory-as-listed-file": (_case_directory_file, UnsafeContentError),
    "symlink-out-of-the-module": (_case_symlink_out, UnsafeContentError),
    "symlinked-folder": (_case_symlinked_folder, UnsafeContentError),
    "path-escaping-the-module": (_case_path_escape, UnsafeContentError),
}


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder next to the module, holding a file a hostile module must never read."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.txt").write_text("cat\ndog\nbird\nfish\n")
    return path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("operation", sorted(OPERATIONS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_module_is_refused_and_runs_nothing(case, operation, warmed, tmp_path, outside):
    tamper, expected = CASES[case]
    directory = tmp_path / "module"
    shutil.copytree(warmed, directory, symlinks=True)
    tamper(directory, outside)
    store = tmp_path / "store"
    _LOADED.clear()
    with _watching(directory, store) as events:
        with pytest.raises(expected) as info:
            OPERATIONS[operation](directory, store)
    assert events == [], f"{case}/{operation}: {events}"
    assert _LOADED == [], f"{case}: graft.load accepted it; it failed only when called"
    if operation == "add":
        # The store loses nothing and keeps nothing of a refused module.
        assert graft.Store(store).list() == []
        blobs = store / "blobs"
        assert not blobs.exists() or not [p for p in blobs.rglob("*") if p.is_file()]


def test_refusal_happens_on_entry_not_at_the_first_call(warmed, tmp_path, outside):
    """A bad program target is refused by graft.load itself, before anything can call it."""
    directory = tmp_path / "module"
    shutil.copytree(warmed, directory)
    _target("builtins.exec")(directory, outside)
    with pytest.raises(FormatError, match="builtins.exec"):
        graft.load(directory)


# -- raw inputs to a benign module ---------------------------------------------------------


@pytest.fixture(scope="module")
def image_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("image") / "tiny"
    graft.save(TinyCNN(), path, name="tiny-image", version="1.0.0",
               signatures={"forward": graft.Signature(
                   "forward", example_inputs=(IMAGES,),
                   preprocess=graft.ImagePreprocess(16, 18, (0.5,) * 3, (0.5,) * 3))})
    return path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("train", [False, True])
def test_hostile_raw_inputs_are_refused_and_run_nothing(image_module, tmp_path, train):
    from PIL import Image

    module = graft.load(image_module, trainable=train)
    module.train(train)
    good = tmp_path / "good.png"
    Image.new("RGB", (20, 24), (10, 200, 30)).save(good)
    module(str(good))  # warm-up: lazy imports of the image path happen here
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_declaring(100_000, 100_000))
    fifo = tmp_path / "input.png"
    os.mkfifo(fifo)
    for bad, expected in ((bomb, DataError), (fifo, DataError), (tmp_path, DataError)):
        with _watching(image_module, bad) as events:
            with pytest.raises(expected):
                module(str(bad))
        assert events == [], (bad, events)


@pytest.mark.timeout(120)
def test_a_training_folder_with_a_fifo_and_a_bomb_skips_them_without_blocking(tmp_path):
    from PIL import Image

    from graft.data import ImageFolder

    for label in ("cats", "dogs"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / label / f"{i}.png")
    os.mkfifo(tmp_path / "cats" / "pipe.png")
    # 81 M pixels: under Pillow's own limit, over Graft's
    (tmp_path / "dogs" / "bomb.png").write_bytes(_png_declaring(9000, 9000))
    with pytest.warns(UserWarning, match="skipped 2"):
        data = ImageFolder(tmp_path)
    reasons = {path.name: reason for path, reason in data.skipped}
    assert set(reasons) == {"pipe.png", "bomb.png"}
    assert "regular file" in reasons["pipe.png"] and "9000x9000" in reasons["bomb.png"]
    assert len(data) == 4


# -- the hook itself ----------------------------------------------------------------------------


class _Reduces:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.getcwd, ())


def test_the_hook_sees_what_it_must(tmp_path):
    """Each event the corpus asserts is absent is seen when it does happen."""
    (tmp_path / "graft_audit_probe.py").write_text("VALUE = 1\n")
    sys.path.insert(0, str(tmp_path))
    inside, elsewhere = tmp_path / "inside", tmp_path / "elsewhere.txt"
    inside.mkdir()
    elsewhere.write_text("x")
    (inside / "link.txt").symlink_to(elsewhere)
    try:
        seen = {}
        with _watching(inside) as events:
            exec("y = 1")  # noqa: S102 - the point of the test
        seen["exec"] = events[:]
        with _watching(inside) as events:
            compile("1 + 1", "<probe>", "eval")
        seen["compile"] = events[:]
        with _watching(inside) as events:
            __import__("graft_audit_probe")
        seen["import"] = events[:]
        with _watching(inside) as events:
            pickle.loads(pickle.dumps(_Reduces()))  # noqa: S301
        seen["pickle.find_class"] = events[:]
        with _watching(inside) as events:
            os.system("true")  # noqa: S605
        seen["os.system"] = events[:]
        with _watching(inside) as events:
            subprocess.run(["true"], check=True)
        seen["subprocess.Popen"] = events[:]
        with _watching(inside) as events:
            (inside / "link.txt").read_text()  # inside by name, outside in fact
        seen["open"] = events[:]
        with _watching(inside) as events:
            (inside / "own.txt").write_text("fine")
        assert events == []
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("graft_audit_probe", None)
    for event, recorded in seen.items():
        assert any(name == event for name, _ in recorded), (event, recorded)
    assert any(detail == os.path.realpath(elsewhere) for _, detail in seen["open"])


def test_the_old_fx_path_would_have_run_the_payload():
    """What the input-name case defends against: torch.fx compiles the names it is given.

    A graph whose placeholder is named by artifact text becomes Python source that is
    compiled and executed when the graph module is built; the hook sees it. Graft's reader
    never hands artifact names to fx.
    """
    import torch.fx

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.ops.aten.relu.default, (x,)))
    with _watching() as events:
        torch.fx.GraphModule(torch.nn.Module(), graph)
    assert {"compile", "exec"} & {name for name, _ in events}


def test_all_errors_of_the_corpus_are_graft_errors():
    assert all(issubclass(expected, GraftError) for _, expected in CASES.values())
