"""The module manifest (``graft.json``), its canonical form and digest, and file checks.

The records it holds (files, tensors, parents, the fine-tuning policy) are in
:mod:`graft.format.entries`.

The module's identity is the sha256 of its canonical manifest: the manifest records the
sha256 of every file and tensor, so the digest pins every byte of the module.
"""

from __future__ import annotations

import hashlib
import json
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
from graft.format.entries import FileEntry, FineTuning, Parent, TensorEntry, check_json_value
from graft.format.fields import (
    check_relative_path,
    expect_identifier,
    expect_list,
    expect_object,
    expect_string,
)
from graft.format.files import open_regular, read_regular
from graft.format.limits import MAX_FILES, MAX_MANIFEST_BYTES, MAX_NAME_CHARS, MAX_SIGNATURES
from graft.format.spec import SignatureSpec

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "Manifest",
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
# A fully-qualified tensor name: dotted parts, none a dunder (they become nn.Module names).
_TENSOR_NAME = re.compile(r"(?!__)[A-Za-z0-9_]+(\.(?!__)[A-Za-z0-9_]+)*", re.ASCII)
_TOP_LEVEL = ("format", "name", "version", "description", "license", "parents",
              "default_signature", "signatures", "fine_tuning", "files", "tensors", "metadata",
              "aliases")


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


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(f"{MANIFEST_NAME} field {what!r} must be an object, got "
                          f"{type(value).__name__}")
    return dict(value)


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
        object.__setattr__(self, "metadata", check_json_value(self.metadata, "metadata"))
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
