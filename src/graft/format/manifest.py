"""The module manifest (``graft.json``), its canonical form and digest, and file checks.

The module's identity is the sha256 of its canonical manifest: the manifest records the
sha256 of every file and tensor, so the digest pins every byte of the module.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

from graft._fs import sha256_stream
from graft.errors import FormatError, IntegrityError, UnsafeContentError
from graft.format import jsonio
from graft.format.fields import (
    check_relative_path,
    expect_bool,
    expect_identifier,
    expect_int,
    expect_list,
    expect_object,
    expect_string,
)
from graft.format.files import open_regular, read_regular
from graft.format.limits import (
    MAX_FILES,
    MAX_JSON_DEPTH,
    MAX_MANIFEST_BYTES,
    MAX_NAME_CHARS,
    MAX_SIGNATURES,
    MAX_TENSOR_ELEMENTS,
    MAX_TENSOR_RANK,
)
from graft.format.spec import DTYPES, SignatureSpec

__all__ = [
    "BATCH_NORM_POLICIES",
    "FORMAT",
    "FileEntry",
    "FineTuning",
    "MANIFEST_NAME",
    "Manifest",
    "Parent",
    "TensorEntry",
    "canonical_json",
    "check_relative_path",
    "resolve_inside",
    "validate_name",
    "validate_version",
]

FORMAT = "graft.module/1"
MANIFEST_NAME = "graft.json"
# Matched with fullmatch and ASCII only: "$" would let a trailing newline through, and "\d"
# matches every Unicode digit.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}", re.ASCII)
_VERSION = re.compile(r"[0-9]{1,18}(\.[0-9]{1,18}){0,2}([-+][0-9A-Za-z.-]{1,64})?", re.ASCII)
_HEX = re.compile(r"[0-9a-f]{64}", re.ASCII)
# A fully-qualified tensor name: dotted parts, none a dunder (they become nn.Module names).
_TENSOR_NAME = re.compile(r"(?!__)[A-Za-z0-9_]+(\.(?!__)[A-Za-z0-9_]+)*", re.ASCII)
# A parent handle: printable ASCII without spaces (name@version, name@sha256:..., oci://...).
_HANDLE = re.compile(r"[!-~]{1,512}", re.ASCII)
_TOP_LEVEL = ("format", "name", "version", "description", "license", "parents",
              "default_signature", "signatures", "fine_tuning", "files", "tensors", "metadata",
              "aliases")
#: What batch norm does when a trainable module runs in train mode.
BATCH_NORM_POLICIES = ("update", "frozen")


def canonical_json(data: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no insignificant whitespace, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise FormatError(f"module name {name!r:.80} is invalid; use lowercase letters, digits, "
                          "'.', '_' and '-', starting with a letter or digit (e.g. 'tiny-cnn')")
    return name


def validate_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise FormatError(f"module version {version!r:.80} is invalid; use a numeric version "
                          "such as '1', '1.0' or '1.0.0' (optionally with -suffix)")
    return version


def _check_json_value(value: Any, what: str, depth: int = 0) -> Any:
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
        return [_check_json_value(v, what, depth + 1) for v in value]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise FormatError(f"{what} has a key {key!r:.80}; JSON object keys are strings")
            out[_check_json_value(key, what, depth + 1)] = _check_json_value(item, what,
                                                                              depth + 1)
        return out
    raise FormatError(f"{what} holds a {type(value).__name__}; only JSON values (objects, "
                      "arrays, strings, numbers, booleans, null) are allowed")


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(f"{MANIFEST_NAME} field {what!r} must be an object, got "
                          f"{type(value).__name__}")
    return dict(value)


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


@dataclass(frozen=True)
class Manifest:
    """The parsed ``graft.json`` of a module."""

    name: str
    version: str
    signatures: Mapping[str, SignatureSpec]
    default_signature: str
    files: Mapping[str, FileEntry]
    tensors: Mapping[str, TensorEntry]
    description: str = ""
    license: str = "unknown"
    parents: tuple[Parent, ...] = ()
    fine_tuning: FineTuning = field(default_factory=FineTuning)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    #: Tied tensors: another name -> the stored tensor it is (an LM head's tied weight).
    aliases: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise FormatError(f"module format {self.format!r} is not supported by this Graft; "
                              f"it reads {FORMAT!r} (upgrade graft-hub to read newer formats)")
        validate_name(self.name)
        validate_version(self.version)
        expect_string(self.description, "description")
        expect_string(self.license, "license")
        for what, limit in (("signatures", MAX_SIGNATURES), ("files", MAX_FILES),
                            ("tensors", MAX_FILES * 10), ("aliases", MAX_FILES * 10)):
            value = getattr(self, what)
            if not isinstance(value, Mapping) or len(value) > limit:
                raise FormatError(f"manifest {what} must be a mapping of at most {limit} "
                                  "entries")
        for key, sig in self.signatures.items():
            expect_identifier(key, "signature name")
            if not isinstance(sig, SignatureSpec):
                raise FormatError(f"signature {key!r} is a {type(sig).__name__}, not a "
                                  "SignatureSpec")
        for key, entry in self.files.items():
            if not isinstance(entry, FileEntry):
                raise FormatError(f"file {key!r:.80} has no FileEntry")
        for key, tensor in self.tensors.items():
            if (not isinstance(key, str) or len(key) > 4 * MAX_NAME_CHARS
                    or not _TENSOR_NAME.fullmatch(key)):
                raise FormatError(f"tensor name {key!r:.80} is not a dotted name of ASCII "
                                  "letters, digits and '_' (parts may not start with '__')")
            if not isinstance(tensor, TensorEntry):
                raise FormatError(f"tensor {key!r} has no TensorEntry")
        if MANIFEST_NAME in self.files:
            raise FormatError(f"the manifest lists {MANIFEST_NAME} among its own files; it "
                              "cannot record its own digest")
        if not isinstance(self.parents, (tuple, list)) or not all(
                isinstance(p, Parent) for p in self.parents):
            raise FormatError("manifest parents must be a sequence of Parent entries")
        if not isinstance(self.fine_tuning, FineTuning):
            raise FormatError("manifest fine_tuning must be a FineTuning")
        if not isinstance(self.metadata, Mapping):
            raise FormatError(f"manifest metadata must be an object, got "
                              f"{type(self.metadata).__name__}")
        object.__setattr__(self, "metadata", _check_json_value(self.metadata, "metadata"))
        if not isinstance(self.default_signature, str) \
                or self.default_signature not in self.signatures:
            raise FormatError(f"default signature {self.default_signature!r} is not one of "
                              f"the signatures {sorted(self.signatures)}")
        for rel in self.files:
            check_relative_path(rel)
        for sig in self.signatures.values():
            for program in sig.programs.values():
                if check_relative_path(program) not in self.files:
                    raise FormatError(f"program {program!r} is not listed in the manifest's "
                                      "files")
            if sig.preprocess is not None and getattr(sig.preprocess, "tokenizer", None):
                if sig.preprocess.tokenizer not in self.files:
                    raise FormatError(f"tokenizer {sig.preprocess.tokenizer!r} is not listed "
                                      "in the manifest's files")
        object.__setattr__(self, "parents", tuple(self.parents))
        for alias, canonical in self.aliases.items():
            if not (isinstance(alias, str) and _TENSOR_NAME.fullmatch(alias)):
                raise FormatError(f"tensor alias {alias!r:.200} is not a dotted tensor name")
            if alias in self.tensors:
                raise FormatError(f"tensor alias {alias!r} is also a stored tensor")
            if not isinstance(canonical, str) or canonical not in self.tensors:
                raise FormatError(f"tensor alias {alias!r} names {canonical!r:.200}, which is "
                                  "not a stored tensor")
        for key in self.fine_tuning.frozen:
            entry = self.tensors.get(key) if isinstance(key, str) else None
            if entry is None or entry.kind != "parameter":
                raise FormatError(f"fine_tuning.frozen names {key!r:.200}, which is not a "
                                  "stored parameter")

    # -- serialisation ---------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "license": self.license,
            "parents": [{"handle": p.handle, "digest": p.digest} for p in self.parents],
            "default_signature": self.default_signature,
            "signatures": {k: v.to_json() for k, v in self.signatures.items()},
            "fine_tuning": {"trainable": self.fine_tuning.trainable,
                            "batch_norm": self.fine_tuning.batch_norm,
                            **({"eval_only": self.fine_tuning.eval_only}
                               if self.fine_tuning.eval_only else {}),
                            **({"frozen": list(self.fine_tuning.frozen)}
                               if self.fine_tuning.frozen else {})},
            "files": {k: {"sha256": v.sha256, "size": v.size} for k, v in self.files.items()},
            "tensors": {k: {"kind": v.kind, "dtype": v.dtype, "shape": list(v.shape),
                            "sha256": v.sha256}
                        for k, v in self.tensors.items()},
            "metadata": dict(self.metadata),
            **({"aliases": dict(self.aliases)} if self.aliases else {}),
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Build a manifest from parsed ``graft.json``, checking every field's type.

        Unknown keys are refused at every level: a field this reader ignored would not be in
        the canonical form, so two manifests that a newer reader tells apart would share a
        digest. Free-form data belongs in ``metadata``.
        """
        if not isinstance(data, dict):
            raise FormatError(f"{MANIFEST_NAME} must hold a JSON object")
        if data.get("format") != FORMAT:
            raise FormatError(f"module format {data.get('format')!r:.80} is not supported by "
                              f"this Graft; it reads {FORMAT!r} (upgrade graft-hub to read "
                              "newer formats)")
        data = expect_object(data, MANIFEST_NAME,
                             required=("format", "name", "version", "default_signature",
                                       "signatures", "files"),
                             optional=_TOP_LEVEL)
        fine = expect_object(data.get("fine_tuning", {}), "fine_tuning",
                             optional=("trainable", "batch_norm", "eval_only", "frozen"))
        parents = []
        for entry in expect_list(data.get("parents", []), "parents", max_items=MAX_FILES):
            entry = expect_object(entry, "parent", required=("handle", "digest"))
            parents.append(Parent(entry["handle"], entry["digest"]))
        files = {}
        for rel, entry in expect_object(data["files"], "files",
                                        optional=data["files"]).items():
            entry = expect_object(entry, f"file entry {rel!r:.80}", required=("sha256", "size"))
            files[check_relative_path(rel)] = FileEntry(entry["sha256"], entry["size"])
        tensors = {}
        for key, entry in expect_object(data.get("tensors", {}), "tensors",
                                        optional=data.get("tensors", {})).items():
            entry = expect_object(entry, f"tensor entry {key!r:.80}",
                                  required=("kind", "dtype", "shape", "sha256"))
            tensors[key] = TensorEntry(entry["kind"], entry["dtype"], entry["shape"],
                                       entry["sha256"])
        signatures = {
            expect_identifier(key, "signature name"): SignatureSpec.from_json(value)
            for key, value in expect_object(data["signatures"], "signatures",
                                            optional=data["signatures"]).items()}
        return cls(
            format=data["format"],
            name=data["name"],
            version=data["version"],
            description=data.get("description", ""),
            license=data.get("license", "unknown"),
            parents=tuple(parents),
            default_signature=data["default_signature"],
            signatures=signatures,
            fine_tuning=FineTuning(fine.get("trainable", False), fine.get("batch_norm", "update"),
                                   fine.get("eval_only", ""),
                                   tuple(expect_list(fine.get("frozen", []), "fine_tuning.frozen",
                                                     max_items=MAX_FILES * 10))),
            files=files,
            tensors=tensors,
            metadata=expect_object(data.get("metadata", {}), "metadata",
                                   optional=data.get("metadata", {})),
            aliases=_mapping(data.get("aliases", {}), "aliases"),
        )

    def canonical(self) -> bytes:
        """The canonical manifest bytes that the digest is computed over."""
        return canonical_json(self.to_json())

    @cached_property
    def digest(self) -> str:
        """``sha256:<hex>`` of the canonical manifest: the module's identity.

        Computed once per manifest (a manifest is immutable; ``dataclasses.replace`` makes a
        new one): adding a module names it in a row per file and tensor, and re-encoding the
        canonical JSON for each took a third of a pull of EfficientNet-Lite0.
        """
        return "sha256:" + hashlib.sha256(self.canonical()).hexdigest()

    @property
    def size(self) -> int:
        """Total bytes of the module's files."""
        return sum(f.size for f in self.files.values())

    # -- files -----------------------------------------------------------------------------

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """Read and validate ``graft.json`` in a module directory."""
        path = Path(directory) / MANIFEST_NAME
        try:
            raw = read_regular(path, what=str(path), max_bytes=MAX_MANIFEST_BYTES)
        except (FileNotFoundError, NotADirectoryError):
            from graft.errors import ModuleNotFound

            raise ModuleNotFound(f"{directory} is not a module: it has no {MANIFEST_NAME}") \
                from None
        return cls.from_bytes(raw, what=str(path))

    @classmethod
    def from_bytes(cls, raw: bytes, *, what: str = MANIFEST_NAME) -> Manifest:
        """Parse ``graft.json`` bytes strictly (``jsonio``) and build the manifest."""
        return cls.from_json(jsonio.loads(raw, what=what, max_bytes=MAX_MANIFEST_BYTES))

    def write(self, directory: Path) -> None:
        """Write ``graft.json`` (pretty-printed; the digest is over the canonical form)."""
        text = json.dumps(self.to_json(), sort_keys=True, indent=2, ensure_ascii=False,
                          allow_nan=False)
        path = Path(directory) / MANIFEST_NAME
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())

    def verify_files(self, directory: Path, *, hash_contents: bool = True) -> None:
        """Check that every listed file exists inside ``directory`` with its recorded digest.

        Raises:
            UnsafeContentError: a listed path is a symlink or escapes the folder.
            IntegrityError: a file is missing, truncated or altered.
        """
        root = Path(directory).resolve()
        for rel, entry in self.files.items():
            path = resolve_inside(root, rel)
            try:
                info = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                raise IntegrityError(f"module {self.name}@{self.version} is missing {rel}; "
                                     "re-fetch or re-import it") from None
            if not stat.S_ISREG(info.st_mode):
                open_regular(path, what=f"module file {rel!r}")  # raises, naming what it is
            if info.st_size != entry.size:
                raise IntegrityError(f"{rel} is {info.st_size} bytes but the manifest records "
                                     f"{entry.size}: the file is truncated or altered")
            if hash_contents:
                # Opened without following links or blocking: a FIFO swapped in after the
                # lstat is refused, not read forever.
                with open_regular(path, what=f"module file {rel!r}") as f:
                    digest = sha256_stream(f)
                if digest != entry.sha256:
                    raise IntegrityError(f"{rel} does not match its sha256 in the manifest: "
                                         "the file was altered; re-fetch or re-import the "
                                         "module")


def resolve_inside(root: Path, rel: str) -> Path:
    """The path of ``rel`` inside ``root``, refusing links and escapes.

    ``rel`` has no ``..``, is relative, and no component below ``root`` is a symbolic link,
    so the path cannot leave ``root``.
    """
    check_relative_path(rel)
    probe = str(root)
    for part in rel.split("/"):
        probe = os.path.join(probe, part)
        if os.path.islink(probe):
            raise UnsafeContentError(f"{rel} in the module is (or passes through) a symbolic "
                                     "link; modules may not contain links")
    return Path(probe)
