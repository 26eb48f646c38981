"""The records a module manifest is made of: its files, tensors, parents and fine-tuning
policy, each checked as it is built, and the check that keeps free-form metadata plain JSON.

:class:`graft.format.manifest.Manifest` holds these records; the manifest's own file keeps its
structure, its serialisation and its digest.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from graft.errors import FormatError
from graft.format.fields import expect_bool, expect_int, expect_list
from graft.format.limits import MAX_JSON_DEPTH, MAX_TENSOR_ELEMENTS, MAX_TENSOR_RANK
from graft.format.spec import DTYPES

__all__ = [
    "BATCH_NORM_POLICIES",
    "FileEntry",
    "FineTuning",
    "Parent",
    "TensorEntry",
    "check_json_value",
]

#: What batch norm does when a trainable module runs in train mode.
BATCH_NORM_POLICIES = ("update", "frozen")
_HEX = re.compile(r"[0-9a-f]{64}", re.ASCII)
# A parent handle: printable ASCII without spaces (name@version, name@sha256:..., oci://...).
_HANDLE = re.compile(r"[!-~]{1,512}", re.ASCII)


def check_json_value(value: Any, what: str, depth: int = 0) -> Any:
    """``value`` as plain JSON (tuples become lists), refusing what JSON cannot hold exactly.

    Metadata is free-form, but the digest is computed over its JSON form: a value that does
    not survive the round trip (a set, a NaN, an int wider than 64 bits) would make two
    different manifests share a digest, or the canonical form unreadable.
    """
    if depth > MAX_JSON_DEPTH - 4:
        raise FormatError(f"{what} nests deeper than {MAX_JSON_DEPTH - 4} levels")
    if value is None or isinstance(value, (bool, str)):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise FormatError(f"{what} holds a string that is not Unicode text") from None
        return value
    if isinstance(value, int):
        return expect_int(value, what, low=-2**63, high=2**63 - 1)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FormatError(f"{what} holds {value}, which JSON cannot represent")
        return value
    if isinstance(value, (list, tuple)):
        return [check_json_value(v, what, depth + 1) for v in value]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise FormatError(f"{what} has a key {key!r:.80}; JSON object keys are strings")
            out[check_json_value(key, what, depth + 1)] = check_json_value(item, what,
                                                                              depth + 1)
        return out
    raise FormatError(f"{what} holds a {type(value).__name__}; only JSON values (objects, "
                      "arrays, strings, numbers, booleans, null) are allowed")


def _hex(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        raise FormatError(f"{what} must be 64 lowercase hex digits, got {value!r:.80}")
    return value


@dataclass(frozen=True)
class FileEntry:
    """The size and sha256 of one file of the module."""

    sha256: str
    size: int

    def __post_init__(self) -> None:
        _hex(self.sha256, "file sha256")
        expect_int(self.size, "file size", low=0, high=2**53)


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: parameter or buffer, dtype, shape, sha256 of its little-endian bytes."""

    kind: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str

    def __post_init__(self) -> None:
        _hex(self.sha256, "tensor sha256")
        if self.kind not in ("parameter", "buffer"):
            raise FormatError(f"tensor kind {self.kind!r:.80} is unknown; expected 'parameter' "
                              "or 'buffer'")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise FormatError(f"tensor dtype {self.dtype!r:.80} is unknown; expected one of "
                              f"{sorted(DTYPES)}")
        shape = expect_list(self.shape, "tensor shape", max_items=MAX_TENSOR_RANK)
        elements = 1
        for dim in shape:
            elements *= expect_int(dim, "tensor dimension", low=0, high=MAX_TENSOR_ELEMENTS)
            if elements > MAX_TENSOR_ELEMENTS:
                raise FormatError(f"tensor of shape {shape} has more than "
                                  f"{MAX_TENSOR_ELEMENTS} elements")
        object.__setattr__(self, "shape", tuple(shape))


@dataclass(frozen=True)
class Parent:
    """A module this one was derived from, pinned by digest."""

    handle: str
    digest: str

    def __post_init__(self) -> None:
        if not isinstance(self.handle, str) or not _HANDLE.fullmatch(self.handle):
            raise FormatError(f"parent handle {self.handle!r:.80} must be printable ASCII "
                              "without spaces, at most 512 characters (e.g. 'name@1.0.0')")
        if not isinstance(self.digest, str) or not self.digest.startswith("sha256:"):
            raise FormatError(f"parent digest must be 'sha256:<64 hex>', got {self.digest!r:.80}")
        _hex(self.digest.removeprefix("sha256:"), "parent digest")


@dataclass(frozen=True)
class FineTuning:
    """How the module behaves when fine-tuned.

    Args:
        trainable: Whether ``graft.load`` makes parameters trainable by default.
        batch_norm: The default batch-norm behaviour in train mode. ``"update"``: normalise
            with batch statistics and update the running statistics (the ``train``
            program). ``"frozen"``: use and keep the running statistics, dropout still on
            (the ``train_frozen_bn`` program), the usual choice for small fine-tuning batches.
        eval_only: Why the module has no train programs (``""``: it has them). Such a module
            runs, but cannot be fine-tuned.
        frozen: Parameters the source model did not train (``requires_grad=False``, e.g. a
            sinusoidal position table); they stay frozen when the module is fine-tuned.
    """

    trainable: bool = False
    batch_norm: str = "update"
    eval_only: str = ""
    frozen: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        expect_bool(self.trainable, "fine_tuning.trainable")
        if not isinstance(self.batch_norm, str) or self.batch_norm not in BATCH_NORM_POLICIES:
            raise FormatError(f"batch_norm {self.batch_norm!r} is unknown; expected one of "
                              f"{BATCH_NORM_POLICIES}")
        if not isinstance(self.eval_only, str) or len(self.eval_only) > 2000:
            raise FormatError("fine_tuning.eval_only must be a string of at most 2000 "
                              "characters (the reason the module has no train programs)")
        if self.eval_only and self.trainable:
            raise FormatError("fine_tuning says the module is trainable by default but also "
                              "eval-only; an eval-only module cannot be trainable")
        object.__setattr__(self, "frozen", tuple(self.frozen))
        if not all(isinstance(k, str) for k in self.frozen):
            raise FormatError("fine_tuning.frozen must list parameter names (strings)")
        if len(set(self.frozen)) != len(self.frozen):
            raise FormatError("fine_tuning.frozen names a parameter twice")
