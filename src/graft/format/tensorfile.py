"""Checking a safetensors file's structure before the safetensors library reads it (no torch).

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON (tensor
name -> dtype, shape, data offsets, plus an optional ``__metadata__`` object of strings), then
the tensor bytes. A file that only carries the ``.safetensors`` name (a pickle, a zip, a
header that declares a 10^12-element tensor or offsets outside the file) is refused here, by
this reader's own bounds, before anything is allocated for it or handed to another parser.

The data region must be covered exactly, in order, without holes or overlaps, as the
safetensors format itself requires: bytes that no tensor claims could hide another file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from graft.errors import FormatError, IntegrityError
from graft.format import jsonio
from graft.format.files import open_regular
from graft.format.limits import (
    MAX_SAFETENSORS_HEADER_BYTES,
    MAX_SAFETENSORS_TENSORS,
    MAX_TENSOR_ELEMENTS,
    MAX_TENSOR_RANK,
)

__all__ = ["SAFETENSORS_DTYPES", "SafetensorsHeader", "TensorInfo", "parse_safetensors_header",
           "read_safetensors_header"]

#: safetensors dtype -> (spec dtype name, bytes per element): the dtypes a module may hold.
SAFETENSORS_DTYPES: Mapping[str, tuple[str, int]] = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "I16": ("int16", 2),
    "I32": ("int32", 4), "I64": ("int64", 8), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F32": ("float32", 4), "F64": ("float64", 8),
}
_TENSOR_KEYS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: spec dtype name, shape, byte range in the data."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """The checked header of a safetensors file.

    Args:
        tensors: Name -> tensor, in file order.
        metadata: The ``__metadata__`` strings.
        data_start: Offset of the data region in the file (8 + header length).
    """

    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str]
    data_start: int


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_safetensors_header(prefix: bytes, file_size: int, *, what: str) -> SafetensorsHeader:
    """Check the header of a safetensors file of ``file_size`` bytes.

    Args:
        prefix: The file's first bytes: at least the 8-byte length and the header it gives.
        file_size: The whole file's size in bytes.
        what: The file, for messages.

    Raises:
        FormatError: the bytes are not a well-formed safetensors file within the limits.
    """
    def refuse(reason: str) -> FormatError:
        return FormatError(f"{what} is not a valid safetensors file: {reason}; the module is "
                           "corrupt or hostile")

    if file_size < 8 or len(prefix) < 8:
        raise refuse(f"it is {file_size} bytes, shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_SAFETENSORS_HEADER_BYTES:
        raise refuse(f"its header length {length} is over the limit of "
                     f"{MAX_SAFETENSORS_HEADER_BYTES} bytes")
    if 8 + length > file_size:
        raise refuse(f"its header length {length} runs past the end of the file "
                     f"({file_size} bytes)")
    if len(prefix) < 8 + length:
        raise refuse("the header was not read whole")
    body = prefix[8:8 + length]
    if not body.startswith(b"{"):
        raise refuse("its header is not a JSON object")
    header = jsonio.loads(body, what=f"{what} header", max_bytes=MAX_SAFETENSORS_HEADER_BYTES)
    if not isinstance(header, dict):
        raise refuse("its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise refuse("its __metadata__ is not an object of strings")
    if len(header) > MAX_SAFETENSORS_TENSORS:
        raise refuse(f"it declares {len(header)} tensors, over the limit of "
                     f"{MAX_SAFETENSORS_TENSORS}")
    data_size = file_size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != _TENSOR_KEYS:
            raise refuse(f"tensor {name!r} must have exactly the keys {sorted(_TENSOR_KEYS)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise refuse(f"tensor {name!r} has dtype {dtype!r}; a module may hold "
                         f"{sorted(SAFETENSORS_DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_RANK
                or not all(_int(d) and d >= 0 for d in shape)):
            raise refuse(f"tensor {name!r} has shape {shape!r}; expected at most "
                         f"{MAX_TENSOR_RANK} non-negative integers")
        elements = 1
        for dim in shape:
            elements *= dim
            if elements > MAX_TENSOR_ELEMENTS:
                raise refuse(f"tensor {name!r} of shape {shape} has more than "
                             f"{MAX_TENSOR_ELEMENTS} elements")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_int(o) and o >= 0 for o in offsets)):
            raise refuse(f"tensor {name!r} has data_offsets {offsets!r}; expected "
                         "[begin, end]")
        begin, end = offsets
        itemsize = SAFETENSORS_DTYPES[dtype][1]
        if end < begin or end - begin != elements * itemsize:
            raise refuse(f"tensor {name!r} ({dtype}{shape}) needs {elements * itemsize} bytes "
                         f"but its data_offsets {offsets} span {end - begin}")
        if end > data_size:
            raise refuse(f"tensor {name!r} ends at byte {end} of a data region of "
                         f"{data_size} bytes")
        tensors[name] = TensorInfo(SAFETENSORS_DTYPES[dtype][0], tuple(shape), begin, end)
    covered = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != covered:
            raise refuse(f"tensor {name!r} starts at byte {info.begin} of the data, but the "
                         f"tensors before it end at {covered} (an overlap or a hole)")
        covered = info.end
    if covered != data_size:
        raise refuse(f"its tensors cover {covered} bytes of a data region of {data_size} "
                     "(trailing bytes that no tensor claims)")
    return SafetensorsHeader(tensors, metadata, 8 + length)


def read_safetensors_header(path: str | os.PathLike[str], *,
                            what: str | None = None) -> SafetensorsHeader:
    """Open a safetensors file safely (a regular file, never blocking) and check its header.

    Raises:
        IntegrityError: the file does not exist.
        UnsafeContentError: it is a link, a FIFO, a device or a directory.
        FormatError: its structure is invalid or over the limits.
    """
    what = what or Path(path).name
    try:
        opened = open_regular(path, what=what)
    except (FileNotFoundError, NotADirectoryError):
        raise IntegrityError(f"{what} is missing; the module is incomplete, re-fetch or "
                             "re-import it") from None
    with opened as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if 8 + length <= min(size, 8 + MAX_SAFETENSORS_HEADER_BYTES):
            head += f.read(length)
        return parse_safetensors_header(head, size, what=what)
