"""The module manifest (``graft.json``), its canonical form and digest, and file checks.

The module's identity is the sha256 of its canonical manifest: the manifest records the
sha256 of every file and tensor, so the digest pins every byte of the module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from graft._fs import sha256_file
from graft.errors import FormatError, IntegrityError, UnsafeContentError
from graft.format.spec import SignatureSpec

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
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_VERSION = re.compile(r"^\d+(\.\d+){0,2}([-+][0-9A-Za-z.-]+)?$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
#: What batch norm does when a trainable module runs in train mode.
BATCH_NORM_POLICIES = ("update", "frozen")


def canonical_json(data: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no insignificant whitespace, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def check_relative_path(rel: str) -> str:
    """Refuse a module-relative path that could escape the module folder."""
    pure = PurePosixPath(rel)
    if (not rel or "\\" in rel or pure.is_absolute() or ".." in pure.parts
            or rel != str(pure) or rel.startswith("~")):
        raise UnsafeContentError(f"path {rel!r} in the module escapes the module folder or is "
                                 "not a plain relative POSIX path; modules may only name "
                                 "files inside themselves")
    return rel


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise FormatError(f"module name {name!r} is invalid; use lowercase letters, digits, "
                          "'.', '_' and '-', starting with a letter or digit (e.g. 'tiny-cnn')")
    return name


def validate_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION.match(version):
        raise FormatError(f"module version {version!r} is invalid; use a numeric version "
                          "such as '1', '1.0' or '1.0.0' (optionally with -suffix)")
    return version


def _hex(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _HEX.match(value):
        raise FormatError(f"{what} must be 64 lowercase hex digits, got {value!r}")
    return value


@dataclass(frozen=True)
class FileEntry:
    """The size and sha256 of one file of the module."""

    sha256: str
    size: int

    def __post_init__(self) -> None:
        _hex(self.sha256, "file sha256")
        if not isinstance(self.size, int) or self.size < 0:
            raise FormatError(f"file size must be a non-negative int, got {self.size!r}")


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
            raise FormatError(f"tensor kind {self.kind!r} is unknown; expected 'parameter' or "
                              "'buffer'")
        object.__setattr__(self, "shape", tuple(self.shape))


@dataclass(frozen=True)
class Parent:
    """A module this one was derived from, pinned by digest."""

    handle: str
    digest: str

    def __post_init__(self) -> None:
        if not isinstance(self.digest, str) or not self.digest.startswith("sha256:"):
            raise FormatError(f"parent digest must be 'sha256:<64 hex>', got {self.digest!r}")
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
    """

    trainable: bool = False
    batch_norm: str = "update"

    def __post_init__(self) -> None:
        if self.batch_norm not in BATCH_NORM_POLICIES:
            raise FormatError(f"batch_norm {self.batch_norm!r} is unknown; expected one of "
                              f"{BATCH_NORM_POLICIES}")


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

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise FormatError(f"module format {self.format!r} is not supported by this Graft; "
                              f"it reads {FORMAT!r} (upgrade graft-hub to read newer formats)")
        validate_name(self.name)
        validate_version(self.version)
        if self.default_signature not in self.signatures:
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
                            "batch_norm": self.fine_tuning.batch_norm},
            "files": {k: {"sha256": v.sha256, "size": v.size} for k, v in self.files.items()},
            "tensors": {k: {"kind": v.kind, "dtype": v.dtype, "shape": list(v.shape),
                            "sha256": v.sha256}
                        for k, v in self.tensors.items()},
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        if not isinstance(data, dict):
            raise FormatError(f"{MANIFEST_NAME} must hold a JSON object")
        if data.get("format") != FORMAT:
            raise FormatError(f"module format {data.get('format')!r} is not supported by this "
                              f"Graft; it reads {FORMAT!r} (upgrade graft-hub to read newer "
                              "formats)")
        try:
            fine = data.get("fine_tuning", {})
            return cls(
                format=data["format"],
                name=data["name"],
                version=data["version"],
                description=data.get("description", ""),
                license=data.get("license", "unknown"),
                parents=tuple(Parent(p["handle"], p["digest"]) for p in data.get("parents", [])),
                default_signature=data["default_signature"],
                signatures={k: SignatureSpec.from_json(v) for k, v in data["signatures"].items()},
                fine_tuning=FineTuning(bool(fine.get("trainable", False)),
                                       fine.get("batch_norm", "update")),
                files={k: FileEntry(v["sha256"], v["size"]) for k, v in data["files"].items()},
                tensors={k: TensorEntry(v["kind"], v["dtype"], tuple(v["shape"]), v["sha256"])
                         for k, v in data.get("tensors", {}).items()},
                metadata=data.get("metadata", {}),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise FormatError(f"{MANIFEST_NAME} is malformed: missing or wrong field "
                              f"({exc!r})") from None

    def canonical(self) -> bytes:
        """The canonical manifest bytes that the digest is computed over."""
        return canonical_json(self.to_json())

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of the canonical manifest: the module's identity."""
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
        if path.is_symlink():
            raise UnsafeContentError(f"{path} is a symbolic link; modules may not contain links")
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            from graft.errors import ModuleNotFound

            raise ModuleNotFound(f"{directory} is not a module: it has no {MANIFEST_NAME}") \
                from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{path} is not valid UTF-8 JSON ({exc}); the module is corrupt "
                              "or not a Graft module") from None
        return cls.from_json(data)

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
                size = path.stat().st_size
            except FileNotFoundError:
                raise IntegrityError(f"module {self.name}@{self.version} is missing {rel}; "
                                     "re-fetch or re-import it") from None
            if size != entry.size:
                raise IntegrityError(f"{rel} is {size} bytes but the manifest records "
                                     f"{entry.size}: the file is truncated or altered")
            if hash_contents and sha256_file(path) != entry.sha256:
                raise IntegrityError(f"{rel} does not match its sha256 in the manifest: the "
                                     "file was altered; re-fetch or re-import the module")


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
