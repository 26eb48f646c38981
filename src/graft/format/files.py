"""Refusing module files that are code or pickles, by name or by content (no torch)."""

from __future__ import annotations

import io
import pickletools
from pathlib import Path

from graft.errors import UnsafeContentError

__all__ = ["SNIFF_BYTES", "refuse_code_or_pickle"]

# Suffixes of files that are code, or containers that unpickle when opened the usual way.
_REFUSED_SUFFIXES = {".py", ".pyc", ".pyo", ".so", ".dll", ".dylib", ".pkl", ".pickle",
                     ".pt", ".pth", ".pt2", ".ckpt", ".joblib"}
# Opcodes through which a pickle imports or calls something.
_CALLING_OPCODES = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX"}
#: How many leading bytes of each file the pickle check reads.
SNIFF_BYTES = 1 << 20


def _is_text_pickle(data: bytes) -> bool:
    """Whether ``data`` opens with a complete protocol 0/1 pickle that imports or calls.

    The opcodes are only decoded (``pickletools.genops``), never executed. Plain text that
    happens to look like an opcode ("cat\ndog\n") does not decode to a complete stream.
    """
    if not data or data[:1] not in b"c(]}iIKLNSVdlptR":
        return False
    calls = False
    try:
        for opcode, _, _ in pickletools.genops(io.BytesIO(data)):
            calls = calls or opcode.name in _CALLING_OPCODES
            if opcode.name == "STOP":
                return calls
    except Exception:  # noqa: BLE001 - any decoding failure means "not a pickle"
        return False
    return False


def refuse_code_or_pickle(rel: str, head: bytes) -> None:
    """Raise ``UnsafeContentError`` if a module file is code or a pickle, by name or content.

    Args:
        rel: The file's path inside the module.
        head: Its first bytes (up to ``SNIFF_BYTES``).
    """
    suffix = Path(rel).suffix.lower()
    reason = None
    if suffix == ".safetensors":
        return  # parsed by safetensors alone, which never unpickles; its header length
        # (8 little-endian bytes) could otherwise look like a pickle protocol header
    if suffix in _REFUSED_SUFFIXES:
        reason = f"its type ({suffix}) is code or a pickle container"
    elif len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5:
        reason = "it is a pickle stream (protocol header 0x80)"
    elif _is_text_pickle(head):
        reason = "it is a pickle stream (GLOBAL opcode)"
    elif head.startswith(b"PK\x03\x04") and b".pkl" in head:
        reason = "it is a zip archive holding a pickle (a torch .pt/.pt2 file)"
    if reason:
        raise UnsafeContentError(f"module file {rel!r} is refused: {reason}. Modules hold "
                                 "only JSON, safetensors and plain data, so that loading one "
                                 "never runs code")
