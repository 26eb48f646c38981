"""Read PyTorch checkpoint files as tensors without unpickling them.

``torch.save`` writes a pickle, and unpickling an untrusted pickle runs whatever code it names.
This reader never calls ``pickle.load`` or ``torch.load``: it decodes the pickle's opcodes with
:func:`pickletools.genops` (a pure decoder) and runs its own small stack machine that knows
only what a state dict is made of: dicts (``collections.OrderedDict``), lists, tuples, strings,
numbers, booleans, ``None`` and tensors (``torch._utils._rebuild_tensor_v2`` / ``_v3`` /
``_rebuild_parameter`` over ``torch.<X>Storage`` or ``torch.storage.UntypedStorage``). Any
other global, and any opcode that would build an arbitrary object, makes it refuse the whole
file with :class:`~graft.errors.UnsafeContentError` before anything is built.

Both on-disk layouts are read:

* the zip layout (torch >= 1.6): ``<prefix>/data.pkl`` plus one ``<prefix>/data/<key>`` record
  of raw bytes per storage, and a ``<prefix>/byteorder`` record;
* the legacy layout (``_use_new_zipfile_serialization=False``): five pickles in a row (magic
  number, protocol version, system info, the object, the sorted storage keys), then each
  storage as an 8-byte element count followed by its raw bytes.
"""

from __future__ import annotations

import io
import math
import os
import pickletools
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from graft.errors import FormatError, UnsafeContentError

__all__ = ["read_torch_checkpoint"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> element dtype: the typed storages torch.save names for the dtypes that
# predate UntypedStorage (quantized ones are left out: their tensors need code to rebuild).
_TYPED_STORAGES: dict[str, torch.dtype] = {
    "BFloat16Storage": torch.bfloat16,
    "BoolStorage": torch.bool,
    "ByteStorage": torch.uint8,
    "CharStorage": torch.int8,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "IntStorage": torch.int32,
    "LongStorage": torch.int64,
    "ShortStorage": torch.int16,
}

# torch.<name> dtypes that _rebuild_tensor_v3 may name next to an UntypedStorage.
_DTYPE_NAMES = (
    "bfloat16", "bool", "complex128", "complex32", "complex64", "float16", "float32", "float64",
    "float4_e2m1fn_x2", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
    "float8_e8m0fnu", "int16", "int32", "int64", "int8", "uint16", "uint32", "uint64", "uint8",
)  # fmt: skip
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in _DTYPE_NAMES
    if isinstance(getattr(torch, name, None), torch.dtype)
}


def read_torch_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read the tensors of a PyTorch checkpoint without running any code from it.

    Args:
        path: a file written by ``torch.save``, in the zip layout or the legacy one.

    Returns:
        A flat ``name -> tensor`` dict in file order. When the saved object is a dict that
        holds a ``'state_dict'`` dict (Lightning and many training scripts) or else a
        ``'model'`` dict, that inner dict is taken. Nested dicts, lists and tuples are
        flattened with dotted names (``{'a': {'b': t}}`` gives ``'a.b'``, ``{'a': [t]}``
        gives ``'a.0'``); values that are not tensors (ints, strings, ``None``) are skipped.
        Every tensor is on the CPU whatever device it was saved from, owns its memory (views
        that shared a storage in the file are copied apart; a tensor saved under two names,
        like tied weights, comes back as one tensor under both, as with ``torch.load``), keeps
        the saved size, dtype and, when dense, stride order, and is a plain tensor:
        ``nn.Parameter`` comes back as its data, with ``requires_grad=False``.

    Raises:
        UnsafeContentError: the pickle names a global other than the few a state dict uses
            (``os.system``, ``builtins.exec``, any class) or uses an opcode that builds
            arbitrary objects; nothing from the file is run.
        FormatError: the file is not a PyTorch checkpoint, is truncated or corrupt, or holds
            no tensors in a dict.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head.startswith(b"PK"):
            obj, tensors = _read_zip(f, path)
        elif head[:1] == b"\x80":
            obj, tensors = _read_legacy(f, path)
        elif not head:
            raise FormatError(
                f"'{path}' is empty, not a PyTorch checkpoint; re-save or re-download it"
            )
        else:
            raise FormatError(
                f"'{path}' is not a PyTorch checkpoint: it starts with {head!r}, not a zip archive "
                "(b'PK') or a pickle (b'\\x80'); pass a file written by torch.save"
            )
    return _flat_state_dict(obj, tensors, path)


# --- What the stack machine builds -------------------------------------------------------------


@dataclass(frozen=True)
class _StorageType:
    """``torch.<X>Storage`` (``dtype`` set) or ``torch.storage.UntypedStorage`` (bytes)."""

    name: str
    dtype: torch.dtype


@dataclass(frozen=True)
class _StorageRef:
    """A storage the pickle refers to by key; its bytes are read after the pickle."""

    key: str
    dtype: torch.dtype  # element type the storage was saved as (uint8 when untyped)
    numel: int  # elements of ``dtype`` the pickle says the storage holds
    view_offset: int = 0  # legacy storage views: first element within the root storage
    view_numel: int | None = None


@dataclass(frozen=True)
class _TensorRef:
    """A tensor to cut out of a storage once all storages are read."""

    storage: _StorageRef
    dtype: torch.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _Function:
    """An allowed global that REDUCE may call: it builds a plain value, never runs file code."""

    name: str
    build: Callable[..., Any]


_Refs = dict[str, _StorageRef]  # storage key -> first reference seen to it


# --- Allowed calls ------------------------------------------------------------------------------


def _ordered_dict(*args: Any) -> dict:
    if not args:
        return {}
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        try:
            return dict(args[0])
        except (TypeError, ValueError) as exc:
            raise FormatError(
                f"collections.OrderedDict got items that are not pairs: {exc}"
            ) from None
    raise FormatError(
        f"collections.OrderedDict got {len(args)} arguments; expected none or a list of pairs"
    )


def _tensor_ref(storage: Any, offset: Any, size: Any, stride: Any, dtype: Any) -> _TensorRef:
    if not isinstance(storage, _StorageRef) or dtype is None:
        raise FormatError(f"a tensor is built over {_describe(storage)}, not over a typed storage")
    if not _is_int(offset) or offset < 0:
        raise FormatError(f"a tensor's storage offset is {offset!r}; expected an int >= 0")
    if not isinstance(size, tuple) or not all(_is_int(n) and n >= 0 for n in size):
        raise FormatError(f"a tensor's size is {size!r}; expected a tuple of ints >= 0")
    if (
        not isinstance(stride, tuple)
        or len(stride) != len(size)
        or not all(_is_int(s) and s >= 0 for s in stride)
    ):
        raise FormatError(f"a tensor's stride is {stride!r}; expected {len(size)} ints >= 0")
    return _TensorRef(storage, dtype, offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
    hooks: Any = None, metadata: Any = None,
) -> _TensorRef:  # fmt: skip
    # A typed storage (torch.FloatStorage, ...) gives the tensor its dtype.
    dtype = storage.dtype if isinstance(storage, _StorageRef) else None
    return _tensor_ref(storage, offset, size, stride, dtype)


def _rebuild_tensor_v3(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any,
    metadata: Any = None,
) -> _TensorRef:  # fmt: skip
    # The dtypes newer than typed storages come as an UntypedStorage plus a dtype argument.
    if not isinstance(dtype, torch.dtype):
        raise FormatError(f"_rebuild_tensor_v3 got dtype {dtype!r}; expected a torch dtype")
    return _tensor_ref(storage, offset, size, stride, dtype)


def _rebuild_parameter(
    data: Any, requires_grad: Any = False, hooks: Any = None, state: Any = None
) -> _TensorRef:
    if not isinstance(data, _TensorRef):
        raise FormatError(f"a parameter wraps {type(data).__name__}, not a tensor")
    return data


def _resolve_global(module: str, name: str) -> Any:
    """The value an allowed ``module.name`` global means; ``None`` when it is not allowed."""
    if module == "collections" and name == "OrderedDict":
        return _Function("collections.OrderedDict", _ordered_dict)
    if module == "torch._utils":
        builds = {
            "_rebuild_tensor_v2": _rebuild_tensor_v2,
            "_rebuild_tensor_v3": _rebuild_tensor_v3,
            "_rebuild_parameter": _rebuild_parameter,
            "_rebuild_parameter_with_state": _rebuild_parameter,
        }
        if name in builds:
            return _Function(f"torch._utils.{name}", builds[name])
    # torch.cuda.<X>Storage comes from files saved on a GPU by old versions of torch.
    if module in ("torch", "torch.cuda") and name in _TYPED_STORAGES:
        return _StorageType(f"{module}.{name}", _TYPED_STORAGES[name])
    if module in ("torch", "torch.storage") and name == "UntypedStorage":
        return _StorageType(f"{module}.{name}", torch.uint8)
    if module == "torch" and name in _DTYPES:
        return _DTYPES[name]
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- The pickle stack machine -------------------------------------------------------------------

_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_SCALARS = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
}  # fmt: skip
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_TUPLE_N = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


def _refuse(where: str, what: str) -> UnsafeContentError:
    return UnsafeContentError(
        f"refusing to read '{where}': its pickle {what}, and loading it would import and run code. "
        "Graft reads only state dicts (tensors in dicts, lists and tuples) from PyTorch "
        "checkpoints; re-save the weights from a trusted environment with "
        "torch.save(model.state_dict(), path) or as safetensors"
    )


def _opcodes(source: BinaryIO, where: str) -> Iterator[tuple[str, Any]]:
    ops = pickletools.genops(source)
    while True:
        try:
            opcode, arg, _ = next(ops)
        except StopIteration:
            return
        except (ValueError, struct.error, EOFError) as exc:
            raise FormatError(
                f"'{where}' holds a truncated or corrupt pickle ({exc}); re-save or re-download it"
            ) from None
        yield opcode.name, arg


def _run_pickle(
    source: BinaryIO, where: str, persistent_load: Callable[[Any], Any] | None = None
) -> Any:
    """Evaluate one pickle (up to its STOP) on a stack machine that builds only plain values."""
    stack: list[Any] = []
    marks: list[list[Any]] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        nonlocal stack
        if not marks:
            raise FormatError(
                f"'{where}' holds a corrupt pickle: an opcode needs a MARK that is not there"
            )
        items, stack = stack, marks.pop()
        return items

    def pop(count: int = 1) -> list[Any]:
        if len(stack) < count:
            raise FormatError(f"'{where}' holds a corrupt pickle: the stack ran empty")
        items = stack[len(stack) - count :]
        del stack[len(stack) - count :]
        return items

    def top(kind: type, op: str) -> Any:
        if not stack or not isinstance(stack[-1], kind):
            got = type(stack[-1]).__name__ if stack else "an empty stack"
            raise FormatError(
                f"'{where}' holds a corrupt pickle: {op} applies to {got}, not a {kind.__name__}"
            )
        return stack[-1]

    def set_items(target: dict, items: list[Any]) -> None:
        if len(items) % 2:
            raise FormatError(
                f"'{where}' holds a corrupt pickle: SETITEMS got an odd number of items"
            )
        for key, value in zip(items[::2], items[1::2], strict=True):
            try:
                target[key] = value
            except TypeError:
                raise FormatError(
                    f"'{where}' holds a dict key of type {type(key).__name__}, which is unhashable"
                ) from None

    for op, arg in _opcodes(source, where):
        if op in ("PROTO", "FRAME"):
            continue
        if op == "STOP":
            if len(stack) != 1 or marks:
                raise FormatError(
                    f"'{where}' holds a corrupt pickle: {len(stack)} values are left at STOP"
                )
            return stack[0]
        if op in _CONSTANTS:
            stack.append(_CONSTANTS[op])
        elif op in _SCALARS:
            stack.append(arg)
        elif op == "MARK":
            marks.append(stack)
            stack = []
        elif op == "POP":
            if stack:
                stack.pop()
            else:
                pop_mark()
        elif op == "POP_MARK":
            pop_mark()
        elif op == "DUP":
            stack.append(top(object, op))
        elif op in _PUTS:
            memo[arg] = top(object, op)
        elif op == "MEMOIZE":
            memo[len(memo)] = top(object, op)
        elif op in _GETS:
            if arg not in memo:
                raise FormatError(
                    f"'{where}' holds a corrupt pickle: memo entry {arg} is read before it is "
                    "written"
                )
            stack.append(memo[arg])
        elif op == "EMPTY_TUPLE":
            stack.append(())
        elif op in _TUPLE_N:
            stack.append(tuple(pop(_TUPLE_N[op])))
        elif op == "TUPLE":
            items = pop_mark()  # first: it replaces `stack`
            stack.append(tuple(items))
        elif op == "EMPTY_LIST":
            stack.append([])
        elif op == "LIST":
            items = pop_mark()
            stack.append(items)
        elif op == "APPEND":
            value = pop()[0]
            top(list, op).append(value)
        elif op == "APPENDS":
            items = pop_mark()
            top(list, op).extend(items)
        elif op == "EMPTY_DICT":
            stack.append({})
        elif op == "DICT":
            target: dict = {}
            set_items(target, pop_mark())
            stack.append(target)
        elif op == "SETITEM":
            items = pop(2)
            set_items(top(dict, op), items)
        elif op == "SETITEMS":
            items = pop_mark()
            set_items(top(dict, op), items)
        elif op in ("GLOBAL", "STACK_GLOBAL"):
            if op == "GLOBAL":
                module, _, name = str(arg).partition(" ")
            else:
                module, name = pop(2)
                if not isinstance(module, str) or not isinstance(name, str):
                    raise FormatError(
                        f"'{where}' holds a corrupt pickle: STACK_GLOBAL needs two strings"
                    )
            value = _resolve_global(module, name)
            if value is None:
                raise _refuse(where, f"references the global '{module}.{name}'")
            stack.append(value)
        elif op == "REDUCE":
            function, args = pop(2)
            if not isinstance(function, _Function):
                raise _refuse(where, f"calls {_describe(function)}")
            if not isinstance(args, tuple):
                raise FormatError(
                    f"'{where}' holds a corrupt pickle: {function.name} got "
                    f"{type(args).__name__} arguments"
                )
            try:
                stack.append(function.build(*args))
            except TypeError:
                raise FormatError(
                    f"'{where}' holds a corrupt pickle: {function.name} got {len(args)} "
                    "arguments, which it does not take"
                ) from None
            except FormatError as exc:
                raise FormatError(f"'{where}' holds a corrupt pickle: {exc}") from None
        elif op == "BUILD":
            # A state dict's OrderedDict carries its `_metadata` (module versions) as state; the
            # tensors do not need it, and a BUILD on anything else would set attributes.
            pop()
            if not stack or not isinstance(stack[-1], dict):
                raise _refuse(where, f"sets the state of {_describe(stack[-1] if stack else None)}")
        elif op == "BINPERSID":
            if persistent_load is None:
                raise FormatError(f"'{where}' holds a storage reference where none is expected")
            stack.append(persistent_load(pop()[0]))
        else:
            # INST, OBJ, NEWOBJ, NEWOBJ_EX, EXT1/2/4 build instances of arbitrary classes; sets,
            # buffers and PERSID never appear in a state dict.
            raise _refuse(where, f"uses the opcode {op}, which a state dict never needs")
    raise FormatError(
        f"'{where}' holds a truncated pickle: it ends before its STOP opcode; re-save or "
        "re-download it"
    )


def _describe(value: Any) -> str:
    if isinstance(value, _StorageType):
        return value.name
    return f"a value of type {type(value).__name__}"


def _storage_loader(where: str, refs: _Refs, legacy: bool) -> Callable[[Any], _StorageRef]:
    """The BINPERSID handler: ``('storage', type, key, location, numel[, view])`` -> a ref."""

    def load(pid: Any) -> _StorageRef:
        size = 6 if legacy else 5
        if not (isinstance(pid, tuple) and len(pid) in (5, size) and pid[0] == "storage"):
            raise FormatError(
                f"'{where}' holds an unknown persistent id {pid!r}; expected "
                "('storage', type, key, location, numel)"
            )
        _, storage_type, key, location, numel = pid[:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, _StorageType):
            raise FormatError(
                f"'{where}' holds a storage of type {storage_type!r}; expected a torch storage type"
            )
        if (
            not isinstance(key, str)
            or not isinstance(location, str)
            or not _is_int(numel)
            or numel < 0
        ):
            raise FormatError(f"'{where}' holds a malformed storage reference {pid!r}")
        ref = refs.setdefault(key, _StorageRef(key, storage_type.dtype, numel))
        if view is None:
            return _StorageRef(key, storage_type.dtype, numel)
        # Files from torch < 1.0 could save a slice of a storage: (view key, offset, numel).
        if not (
            isinstance(view, tuple) and len(view) == 3 and _is_int(view[1]) and _is_int(view[2])
        ):
            raise FormatError(f"'{where}' holds a malformed storage view {view!r}")
        _, offset, view_numel = view
        if offset < 0 or view_numel < 0 or offset + view_numel > ref.numel:
            raise FormatError(
                f"'{where}' holds a storage view {view!r} outside its storage of "
                f"{ref.numel} elements"
            )
        return _StorageRef(key, storage_type.dtype, numel, offset, view_numel)

    return load


# --- The two layouts ----------------------------------------------------------------------------


def _read_zip(f: BinaryIO, path: Path) -> tuple[Any, dict[_TensorRef, torch.Tensor]]:
    try:
        with zipfile.ZipFile(f) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                kind = (
                    "a TorchScript archive"
                    if any(n.endswith("/constants.pkl") for n in names)
                    else "a zip archive"
                )
                raise FormatError(
                    f"'{path}' is {kind} without exactly one '<name>/data.pkl' record "
                    f"(found {len(pickles)}), so it is not a torch.save checkpoint"
                )
            prefix = pickles[0][: -len("data.pkl")]
            byteorder = "little"
            if prefix + "byteorder" in names:
                byteorder = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise FormatError(
                    f"'{path}' records byte order {byteorder!r}; expected 'little' or 'big'"
                )

            refs: _Refs = {}
            data = archive.read(pickles[0])
            obj = _run_pickle(
                io.BytesIO(data), str(path), _storage_loader(str(path), refs, legacy=False)
            )

            storages: dict[str, bytearray] = {}
            for key, ref in refs.items():
                name = f"{prefix}data/{key}"
                try:
                    info = archive.getinfo(name)
                except KeyError:
                    raise FormatError(
                        f"'{path}' lacks the record '{name}' that its pickle refers to; "
                        "the file is incomplete"
                    ) from None
                expected = ref.numel * ref.dtype.itemsize
                if info.file_size != expected:
                    raise FormatError(
                        f"'{path}': record '{name}' holds {info.file_size} bytes; its pickle "
                        f"expects {expected}"
                    )
                with archive.open(info) as record:
                    storages[key] = _read_exactly(record, expected, f"record '{name}' of '{path}'")
    except zipfile.BadZipFile as exc:
        raise FormatError(
            f"'{path}' is a truncated or corrupt zip archive ({exc}); re-save or re-download it"
        ) from None
    return obj, _materialize(obj, storages, byteorder, str(path))


class _Bounded(io.RawIOBase):
    """A file whose ``read(n)`` never asks for more than what is left.

    ``pickletools`` reads a length-prefixed string with one ``read(n)``; on a buffered file
    that allocates ``n`` bytes first, so a forged length of 2**62 would exhaust memory.
    """

    def __init__(self, f: BinaryIO) -> None:
        super().__init__()
        self._f = f
        self._size = os.fstat(f.fileno()).st_size

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._f.tell()

    def read(self, size: int = -1) -> bytes:
        if size is not None and 0 <= size <= 1 << 16:  # small reads: the common, cheap case
            return self._f.read(size)
        left = max(self._size - self._f.tell(), 0)
        return self._f.read(left if size is None or size < 0 else min(size, left))

    def readinto(self, buffer: Any) -> int:
        return self._f.readinto(buffer)

    def readline(self, size: int = -1) -> bytes:
        return self._f.readline(size)


def _read_legacy(file: BinaryIO, path: Path) -> tuple[Any, dict[_TensorRef, torch.Tensor]]:
    where = str(path)
    f = _Bounded(file)
    magic = _run_pickle(f, where)
    if magic != _LEGACY_MAGIC:
        raise FormatError(
            f"'{path}' is a pickle but not a PyTorch checkpoint (no torch.save magic number)"
        )
    protocol = _run_pickle(f, where)
    if protocol != _LEGACY_PROTOCOL:
        raise FormatError(
            f"'{path}' uses legacy protocol {protocol!r}; only {_LEGACY_PROTOCOL} is known"
        )
    sys_info = _run_pickle(f, where)
    if not isinstance(sys_info, dict):
        raise FormatError(f"'{path}' has a malformed system-info record {sys_info!r}")
    byteorder = "little" if sys_info.get("little_endian", True) else "big"

    refs: _Refs = {}
    obj = _run_pickle(f, where, _storage_loader(where, refs, legacy=True))
    keys = _run_pickle(f, where)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise FormatError(f"'{path}' has a malformed storage-key list")

    remaining = os.fstat(file.fileno()).st_size - f.tell()
    storages: dict[str, bytearray] = {}
    for key in keys:
        if key not in refs:
            raise FormatError(f"'{path}' stores storage '{key}', which its pickle never refers to")
        itemsize = refs[key].dtype.itemsize
        head = f.read(8)
        if len(head) != 8:
            raise FormatError(
                f"'{path}' is truncated: storage '{key}' has no size; re-save or re-download it"
            )
        count = int.from_bytes(head, byteorder, signed=True)
        nbytes = count * itemsize
        remaining -= 8
        if count < 0 or nbytes > remaining:
            raise FormatError(
                f"'{path}' is truncated: storage '{key}' needs {nbytes} bytes and "
                f"{max(remaining, 0)} remain; re-save or re-download it"
            )
        storages[key] = _read_exactly(f, nbytes, f"storage '{key}' of '{path}'")
        remaining -= nbytes
    missing = set(refs) - set(storages)
    if missing:
        raise FormatError(
            f"'{path}' lacks the storages {sorted(missing)} that its pickle refers to"
        )
    return obj, _materialize(obj, storages, byteorder, where)


def _read_exactly(stream: BinaryIO, nbytes: int, what: str) -> bytearray:
    # A bytearray per storage: writable (torch.frombuffer wants that) and suitably aligned.
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    done = 0
    while done < nbytes:
        got = stream.readinto(view[done:])
        if not got:
            raise FormatError(
                f"{what} is truncated: {done} of {nbytes} bytes; re-save or re-download it"
            )
        done += got
    return buffer


# --- From references to tensors -----------------------------------------------------------------


def _tensor_refs(obj: Any) -> Iterator[_TensorRef]:
    """Every tensor reference in ``obj``, without recursion (the pickle may nest deeply or loop)."""
    pending, seen = [obj], set()
    while pending:
        value = pending.pop()
        if isinstance(value, _TensorRef):
            yield value
        elif isinstance(value, (dict, list, tuple)) and id(value) not in seen:
            seen.add(id(value))
            pending.extend(value.values() if isinstance(value, dict) else value)


def _materialize(
    obj: Any, storages: dict[str, bytearray], byteorder: str, where: str
) -> dict[_TensorRef, torch.Tensor]:
    return {ref: _tensor(ref, storages, byteorder, where) for ref in _tensor_refs(obj)}


def _tensor(
    ref: _TensorRef, storages: dict[str, bytearray], byteorder: str, where: str
) -> torch.Tensor:
    storage = ref.storage
    data = memoryview(storages[storage.key])
    stored_itemsize = storage.dtype.itemsize
    start = storage.view_offset * stored_itemsize
    stop = len(data) if storage.view_numel is None else start + storage.view_numel * stored_itemsize
    data = data[start:stop]

    itemsize = ref.dtype.itemsize
    count = len(data) // itemsize
    if math.prod(ref.size) == 0:
        return torch.empty(ref.size, dtype=ref.dtype)
    extent = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True)) + 1
    if extent > count:
        raise FormatError(
            f"'{where}' holds a tensor of size {list(ref.size)}, stride {list(ref.stride)}, "
            f"offset {ref.offset} that reaches element {extent} of a storage of {count}; "
            "the file is corrupt"
        )
    if byteorder == "big" and itemsize > 1:
        # A complex number is two floats, each swapped on its own.
        part = itemsize // 2 if ref.dtype.is_complex else itemsize
        raw = torch.frombuffer(data, dtype=torch.uint8, count=count * itemsize)
        flat = raw.view(-1, part).flip(-1).reshape(-1).view(ref.dtype)
    else:
        flat = torch.frombuffer(data, dtype=ref.dtype, count=count)
    # clone() keeps a dense stride order, owns its memory, and leaves the file's buffer behind.
    return torch.as_strided(flat, ref.size, ref.stride, ref.offset).clone()


_LEAVE = object()  # marks, on the walk's stack, the end of a container's children
_MAX_VISITS = 10_000_000


def _flat_state_dict(
    obj: Any, tensors: dict[_TensorRef, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise FormatError(
            f"'{path}' holds a {_kind(obj)}, not a dict of tensors; save a state dict instead"
        )
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break

    out: dict[str, torch.Tensor] = {}
    # Depth-first in file order with an explicit stack, since a hostile pickle may nest deeply,
    # contain itself (through its memo) or share one container many times over.
    pending: list[tuple[Any, Any]] = [(obj, "")]
    on_path: set[int] = set()
    budget = _MAX_VISITS
    while pending:
        value, name = pending.pop()
        budget -= 1
        if budget < 0:
            raise FormatError(
                f"'{path}' holds more than {_MAX_VISITS} values once shared containers are expanded"
            )
        if value is _LEAVE:
            on_path.discard(name)
        elif isinstance(value, _TensorRef):
            if name in out:
                raise FormatError(
                    f"'{path}' holds two tensors that flatten to the same name '{name}'"
                )
            out[name] = tensors[value]
        elif isinstance(value, (dict, list, tuple)):
            if id(value) in on_path:
                raise FormatError(f"'{path}' holds a container that contains itself (at '{name}')")
            on_path.add(id(value))
            pending.append((_LEAVE, id(value)))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            children = [(child, f"{name}.{key}" if name else str(key)) for key, child in items]
            pending.extend(reversed(children))
    if not out:
        raise FormatError(f"'{path}' holds no tensors")
    return out


def _kind(obj: Any) -> str:
    return "tensor" if isinstance(obj, _TensorRef) else type(obj).__name__
