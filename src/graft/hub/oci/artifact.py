"""The mapping between a Graft module and an OCI artifact (see docs/registry.md).

A module is an OCI image manifest (schema 2, OCI 1.1) whose ``artifactType`` is
``application/vnd.graft.module.v1+json``:

- config: the canonical ``graft.json`` bytes, so the config digest IS the module digest;
- layers, in this order: every file except the safetensors files, by path; then each
  safetensors file (``weights.safetensors``, the reference and constant files), by path, as
  its header (the first 8 + N bytes) followed by one blob per tensor in the order of the
  file's data section. A tensor blob holds the tensor's raw little-endian bytes, so for
  ``weights.safetensors`` its digest is the ``sha256`` the manifest records for the tensor;
- ``subject``: the parent's OCI manifest, when the parent is in the same repository.

A safetensors file is rebuilt as header + tensor blobs, which reproduces it byte for byte
whatever wrote it: its data section is the tensors back to back, with no gaps, in offset
order. Every function that reads a registry's bytes here validates them completely before
anything is built.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from graft._fs import sha256_bytes
from graft.errors import FormatError, IntegrityError
from graft.format import jsonio
from graft.format.manifest import MANIFEST_NAME, Manifest, canonical_json, check_relative_path
from graft.hub import tensorfiles
from graft.hub.tensors import HEADER_LINK, is_split, read_layout

__all__ = [
    "ARTIFACT_TYPE",
    "CONFIG_TYPE",
    "Descriptor",
    "FILE_TYPE",
    "HEADER_TYPE",
    "INDEX_TYPE",
    "MANIFEST_TYPE",
    "Plan",
    "TENSOR_TYPE",
    "TensorFile",
    "WEIGHTS",
    "build_manifest",
    "parse_header",
    "parse_manifest",
    "split_safetensors",
]

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
ARTIFACT_TYPE = "application/vnd.graft.module.v1+json"
CONFIG_TYPE = "application/vnd.graft.module.config.v1+json"
FILE_TYPE = "application/vnd.graft.module.file.v1"
HEADER_TYPE = "application/vnd.graft.safetensors.header.v1"
TENSOR_TYPE = "application/vnd.graft.tensor.v1"
TITLE = "org.opencontainers.image.title"
VERSION = "org.opencontainers.image.version"
TENSOR_NAME = "vnd.graft.tensor.name"
WEIGHTS = "weights.safetensors"

MAX_MANIFEST = 4 << 20  # distribution's own limit on a manifest
MAX_CONFIG = 16 << 20
MAX_HEADER = 64 << 20
_MAX_LAYERS = 100_000
_MAX_BLOB = 1 << 40
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor (digest, size, media type, annotations)."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    artifact_type: str | None = None

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def from_json(cls, data: Any, what: str) -> Descriptor:
        if not isinstance(data, dict):
            raise FormatError(f"{what} is not a JSON object")
        media, digest, size = data.get("mediaType"), data.get("digest"), data.get("size")
        if not isinstance(media, str) or not 0 < len(media) <= 255:
            raise FormatError(f"{what} has no valid mediaType")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise FormatError(f"{what} has digest {str(digest)[:80]!r}; expected 'sha256:' and "
                              "64 lowercase hex digits")
        if type(size) is not int or not 0 <= size <= _MAX_BLOB:
            raise FormatError(f"{what} has size {size!r}; expected a non-negative integer")
        annotations = data.get("annotations", {})
        if not isinstance(annotations, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
            raise FormatError(f"{what} has annotations that are not string to string")
        artifact = data.get("artifactType")
        if artifact is not None and not isinstance(artifact, str):
            raise FormatError(f"{what} has a non-string artifactType")
        return cls(media, digest, size, annotations, artifact)


@dataclass(frozen=True)
class TensorFile:
    """A safetensors file of the module as blobs: its header, then its tensors in data order."""

    header: Descriptor
    tensors: tuple[tuple[str, Descriptor], ...]

    @property
    def size(self) -> int:
        return self.header.size + sum(d.size for _, d in self.tensors)


@dataclass(frozen=True)
class Plan:
    """A validated Graft artifact: what to fetch and how to lay it out.

    Args:
        config: The config descriptor (its digest is the module digest).
        files: Module path -> descriptor of every file sent whole.
        tensor_files: Module path -> the blobs of every safetensors file sent as header and
            tensors (``weights.safetensors``, reference and constant files).
        subject: The parent's manifest descriptor, if given.
    """

    config: Descriptor
    files: Mapping[str, Descriptor]
    tensor_files: Mapping[str, TensorFile]
    subject: Descriptor | None = None

    @property
    def tensors(self) -> tuple[tuple[str, Descriptor], ...]:
        """The tensors of ``weights.safetensors`` (the module's own tensors)."""
        weights = self.tensor_files.get(WEIGHTS)
        return weights.tensors if weights is not None else ()

    def blobs(self) -> dict[str, Descriptor]:
        """Every distinct layer blob, by digest."""
        out: dict[str, Descriptor] = {}
        for d in self.files.values():
            out.setdefault(d.digest, d)
        for split in self.tensor_files.values():
            for d in (split.header, *(d for _, d in split.tensors)):
                out.setdefault(d.digest, d)
        return out

    def check(self, manifest: Manifest) -> None:
        """Refuse layers that do not match the module's own manifest, file for file and
        tensor for tensor."""
        sent = set(self.files) | set(self.tensor_files)
        if sent != set(manifest.files) or set(self.files) & set(self.tensor_files):
            raise FormatError(f"the artifact's layers carry the files {sorted(sent)[:6]}, not "
                              f"the files of {MANIFEST_NAME} {sorted(manifest.files)[:6]}")
        for rel, d in self.files.items():
            entry = manifest.files[rel]
            if d.hex != entry.sha256 or d.size != entry.size:
                raise IntegrityError(f"the artifact's layer for {rel} ({d.digest}, {d.size} "
                                     f"bytes) is not the file {MANIFEST_NAME} records")
        for rel, split in self.tensor_files.items():
            names = [n for n, _ in split.tensors]
            if split.size != manifest.files[rel].size or len(set(names)) != len(names):
                raise IntegrityError(f"the artifact's layers for {rel} add up to {split.size} "
                                     f"bytes, not the {manifest.files[rel].size} that "
                                     f"{MANIFEST_NAME} records, or repeat a tensor")
        if WEIGHTS in self.tensor_files:
            names = {n for n, _ in self.tensors}
            if names != set(manifest.tensors):
                raise FormatError(f"the artifact's tensor layers ({len(names)}) do not match "
                                  f"the {len(manifest.tensors)} tensors of {MANIFEST_NAME}")
            for name, d in self.tensors:
                if d.hex != manifest.tensors[name].sha256:
                    raise IntegrityError(f"the artifact's layer for tensor {name} ({d.digest}) "
                                         f"is not the tensor {MANIFEST_NAME} records")


def _stored_tensor_file(rel: str, header_hex: str, header_size: int, header_source: Path,
                        tensors: Any, blob_path: Callable[[str], Path],
                        sources: dict[str, tuple[Path, int, int]]) -> TensorFile:
    """A safetensors file the store keeps as blobs: its header and tensor descriptors, each
    blob's source recorded in ``sources`` (path, offset, size) for the push to read."""
    header = Descriptor(HEADER_TYPE, "sha256:" + header_hex, header_size, {TITLE: rel})
    sources.setdefault(header.digest, (header_source, 0, header_size))
    described = []
    for name, hexdigest, size in tensors:
        d = Descriptor(TENSOR_TYPE, "sha256:" + hexdigest, size, {TENSOR_NAME: name})
        described.append((name, d))
        sources.setdefault(d.digest, (blob_path(hexdigest), 0, size))
    return TensorFile(header, tuple(described))



def build_manifest(module: Manifest, directory: Path, subject: Descriptor | None = None,
                   blob_path: Any = None
                   ) -> tuple[bytes, Plan, dict[str, tuple[Path, int, int]]]:
    """The OCI manifest bytes of a module directory, or of a store tree whose weights and
    reference files are tensor blobs (``blob_path``: the store's hex sha256 -> blob; the
    store checked them when it opened the module, and their bytes are sent straight from
    the blobs: the store's blobs are the artifact's layers).

    Returns:
        ``(manifest bytes, plan, sources)``: ``sources`` maps each layer digest to the file
        and byte range ``[start, end)`` that holds it.

    Raises:
        IntegrityError: a tensor's bytes in ``weights.safetensors`` do not hash to the
            manifest's record, or the file is not laid out as its header says.
    """
    config_bytes = module.canonical()
    config = Descriptor(CONFIG_TYPE, module.digest, len(config_bytes))
    files: dict[str, Descriptor] = {}
    tensor_files: dict[str, TensorFile] = {}
    sources: dict[str, tuple[Path, int, int]] = {}
    stored_split = tensorfiles.read_record(directory, module) if blob_path is not None else {}
    for rel, entry in sorted(module.files.items()):
        path = directory / rel
        if rel in stored_split:
            split = stored_split[rel]
            tensor_files[rel] = _stored_tensor_file(
                rel, split.header[0], split.header[1], blob_path(split.header[0]),
                split.tensors, blob_path, sources)
            continue
        if rel == WEIGHTS and blob_path is not None and is_split(directory):
            layout = read_layout(directory, module)
            tensor_files[rel] = _stored_tensor_file(
                rel, layout.header_sha256, len(layout.header), directory / HEADER_LINK,
                layout.tensors, blob_path, sources)
            continue
        if rel.endswith(".safetensors"):
            expected = ({n: t.sha256 for n, t in module.tensors.items()} if rel == WEIGHTS
                        else None)
            try:
                header_bytes, layout = split_safetensors(path, expected)
            except FormatError:
                if rel == WEIGHTS:
                    raise
                layout = None  # not splittable: it travels whole, like any file
            if layout is not None:
                header = Descriptor(HEADER_TYPE, "sha256:" + sha256_bytes(header_bytes),
                                    len(header_bytes), {TITLE: rel})
                sources.setdefault(header.digest, (path, 0, len(header_bytes)))
                tensors = []
                for name, start, end, hexdigest in layout:
                    d = Descriptor(TENSOR_TYPE, "sha256:" + hexdigest, end - start,
                                   {TENSOR_NAME: name})
                    tensors.append((name, d))
                    sources.setdefault(d.digest, (path, start, end))
                tensor_files[rel] = TensorFile(header, tuple(tensors))
                continue
        files[rel] = Descriptor(FILE_TYPE, "sha256:" + entry.sha256, entry.size, {TITLE: rel})
        sources.setdefault(files[rel].digest, (path, 0, entry.size))
    plan = Plan(config, files, tensor_files, subject)
    layers = [*files.values()]
    for split in tensor_files.values():
        layers += [split.header, *(d for _, d in split.tensors)]
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": config.to_json(),
        "layers": [d.to_json() for d in layers],
        "annotations": {TITLE: module.name, VERSION: module.version},
    }
    if subject is not None:
        body["subject"] = subject.to_json()
    return canonical_json(body), plan, sources


def parse_manifest(data: bytes, what: str) -> Plan:
    """Validate an OCI manifest as a Graft artifact.

    Raises:
        FormatError: it is not an OCI image manifest, not a Graft module, or a layer is
            malformed, unknown, duplicated or out of order.
    """
    body = jsonio.loads(data, what=what, max_bytes=MAX_MANIFEST)
    if not isinstance(body, dict) or body.get("schemaVersion") != 2:
        raise FormatError(f"{what} is not an OCI image manifest (schemaVersion 2)")
    if body.get("mediaType", MANIFEST_TYPE) != MANIFEST_TYPE:
        raise FormatError(f"{what} has mediaType {str(body.get('mediaType'))[:80]!r}; a Graft "
                          f"module is an {MANIFEST_TYPE}")
    if body.get("artifactType") != ARTIFACT_TYPE:
        raise FormatError(f"{what} has artifactType {str(body.get('artifactType'))[:80]!r}, "
                          f"not {ARTIFACT_TYPE!r}: it is not a Graft module")
    config = Descriptor.from_json(body.get("config"), f"{what}: config")
    if config.media_type != CONFIG_TYPE or config.size > MAX_CONFIG:
        raise FormatError(f"{what}: config is {config.media_type!r} of {config.size} bytes; a "
                          f"Graft module's config is a {CONFIG_TYPE} of at most {MAX_CONFIG}")
    layers = body.get("layers")
    if not isinstance(layers, list) or len(layers) > _MAX_LAYERS:
        raise FormatError(f"{what} has no list of at most {_MAX_LAYERS} layers")
    files: dict[str, Descriptor] = {}
    splits: dict[str, tuple[Descriptor, list[tuple[str, Descriptor]]]] = {}
    current: list[tuple[str, Descriptor]] | None = None
    for i, raw in enumerate(layers):
        d = Descriptor.from_json(raw, f"{what}: layer {i}")
        if d.media_type in (FILE_TYPE, HEADER_TYPE):
            rel = check_relative_path(d.annotations.get(TITLE, ""))
            if rel in files or rel in splits or rel == MANIFEST_NAME:
                raise FormatError(f"{what}: layer {i} repeats the file {rel!r} or is reserved")
            if d.media_type == FILE_TYPE:
                if splits:
                    raise FormatError(f"{what}: file layer {rel!r} comes after a tensor file")
                files[rel] = d
            else:
                if not rel.endswith(".safetensors") or d.size > MAX_HEADER:
                    raise FormatError(f"{what}: header layer {rel!r} is not a safetensors "
                                      "file's, or is oversized")
                current = []
                splits[rel] = (d, current)
        elif d.media_type == TENSOR_TYPE:
            name = d.annotations.get(TENSOR_NAME)
            if current is None or not name or len(name) > 1024 or not name.isprintable():
                raise FormatError(f"{what}: tensor layer {i} comes before any header or has no "
                                  f"printable {TENSOR_NAME} annotation")
            current.append((name, d))
        else:
            raise FormatError(f"{what}: layer {i} has the unknown mediaType "
                              f"{d.media_type[:80]!r}")
    subject = (Descriptor.from_json(body["subject"], f"{what}: subject")
               if body.get("subject") is not None else None)
    tensor_files = {rel: TensorFile(h, tuple(t)) for rel, (h, t) in splits.items()}
    return Plan(config, files, tensor_files, subject)


def parse_header(header: bytes, sizes: Mapping[str, int] | None = None
                 ) -> list[tuple[str, int, int]]:
    """The tensors of a safetensors header as ``(name, start, end)`` in file order, absolute
    offsets into the file.

    Args:
        header: The file's first ``8 + N`` bytes.
        sizes: The byte length each tensor must have (the pull side: the layers' sizes).

    Raises:
        FormatError: the header is malformed, or its tensors leave gaps or overlap.
    """
    if len(header) < 8:
        raise FormatError(f"the {WEIGHTS} header is {len(header)} bytes; too short")
    (n,) = struct.unpack("<Q", header[:8])
    if n != len(header) - 8 or n > MAX_HEADER:
        raise FormatError(f"the {WEIGHTS} header says it is {n} bytes long, but it is "
                          f"{len(header) - 8}")
    body = jsonio.loads(header[8:], what=f"the {WEIGHTS} header", max_bytes=MAX_HEADER)
    if not isinstance(body, dict):
        raise FormatError(f"the {WEIGHTS} header is not a JSON object")
    spans = []
    for name, entry in body.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            raise FormatError(f"the {WEIGHTS} header gives tensor {name[:80]!r} no valid "
                              "data_offsets")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    position = 0
    out = []
    for start, end, name in spans:
        if start != position:
            raise FormatError(f"the {WEIGHTS} data section has a gap or overlap at tensor "
                              f"{name[:80]!r}")
        if sizes is not None and sizes.get(name) != end - start:
            raise FormatError(f"the {WEIGHTS} header gives tensor {name[:80]!r} {end - start} "
                              "bytes, unlike its layer")
        out.append((name, len(header) + start, len(header) + end))
        position = end
    if sizes is not None and set(sizes) != {name for _, _, name in spans}:
        raise FormatError(f"the {WEIGHTS} header does not name the tensors of the layers")
    return out


def split_safetensors(path: Path, expected: Mapping[str, str] | None = None
                      ) -> tuple[bytes, list[tuple[str, int, int, str]]]:
    """Read a safetensors file as its header bytes and ``(name, start, end, sha256 hex)`` of
    each tensor in data order, checking that the tensors cover the file exactly.

    Args:
        expected: Tensor name -> the sha256 the manifest records (``weights.safetensors``);
            a tensor that differs, or a different set of names, is an ``IntegrityError``.
    """
    with open(path, "rb") as f:
        prefix = f.read(8)
        (n,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (-1,)
        if not 0 <= n <= MAX_HEADER:
            raise FormatError(f"{path} is not a safetensors file")
        header = prefix + f.read(n)
        layout = parse_header(header)
        names = {name for name, _, _ in layout}
        if expected is not None and names != set(expected):
            raise IntegrityError(f"{path} holds tensors {sorted(names ^ set(expected))[:5]} "
                                 f"that differ from the tensors {MANIFEST_NAME} lists")
        end = layout[-1][2] if layout else len(header)
        out = []
        for name, start, stop in layout:
            f.seek(start)
            digest = hashlib.sha256()
            left = stop - start
            while left:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                digest.update(chunk)
                left -= len(chunk)
            if left or (expected is not None and digest.hexdigest() != expected[name]):
                raise IntegrityError(f"tensor {name} in {path} does not match its sha256 in "
                                     f"{MANIFEST_NAME}; the module is damaged, re-import it")
            out.append((name, start, stop, digest.hexdigest()))
        f.seek(0, 2)
        if f.tell() != end:
            raise FormatError(f"{path} has {f.tell() - end} bytes past its last tensor; it "
                              "cannot be split into tensor blobs")
    return header, out
