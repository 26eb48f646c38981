"""Reference files as tensor blobs: ``reference/<signature>.safetensors`` stored as its header
and one blob per tensor, like the weights (hub/tensors.py), so that a child saved with its
parent's example inputs shares them.

A reference file holds a signature's example inputs and the outputs they gave. A fine-tuned
child is usually saved with its parent's examples (the zoo's and ``graft import-head`` do
so), so its inputs, EfficientNet-Lite0's two 224x224 images (1.2 MB), are byte for byte the
parent's, and two signatures of one module share them too; only the outputs differ. Each
tensor blob is named by the sha256 of its raw bytes, the same digest the OCI mapping gives the
tensor's layer (docs/registry.md), so a pull finds them in the store and a push sends them
from it.

The manifest records no per-tensor digests for these files, so the tree keeps a record,
:data:`RECORD`, of each split file's header blob and tensor blobs in data order. Nothing in
it is trusted: its sizes must add up to the file's size in the manifest, every blob is named
by the sha256 it must hash to, and a full check (``graft verify``, adoption after an index
loss) rebuilds the file's bytes, which must hash to the manifest's ``sha256``, and parses the
header as ``graft add`` did.

Program constants (``programs/*.constants.safetensors``) stay whole files: the runtime reads
them from the tree at a program's first call, they are small, and they are rarely shared.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from graft.errors import FormatError, GraftError, IntegrityError
from graft.format import files, jsonio
from graft.format.entries import FileEntry
from graft.format.limits import MAX_SAFETENSORS_HEADER_BYTES, MAX_SAFETENSORS_TENSORS
from graft.format.manifest import Manifest
from graft.format.tensorfile import parse_safetensors_header
from graft.hub.blobs import open_regular, publish
from graft.hub import tensors

__all__ = ["RECORD", "FileLayout", "check", "is_stored_split", "place", "read_record",
           "rebuild", "write_record"]

#: The tree's record of its split files (module paths never start with ".").
RECORD = ".tensor-files.json"
_FORMAT = "graft.tensor-files/1"
_MAX_RECORD = 64 << 20
_HEX = frozenset("0123456789abcdef")


def is_stored_split(rel: str) -> bool:
    """Whether the store keeps the module file ``rel`` as tensor blobs (reference files)."""
    return rel.startswith("reference/") and rel.endswith(".safetensors")


@dataclass(frozen=True)
class FileLayout:
    """A safetensors file of a module as blobs.

    Args:
        header: ``(hex sha256, size)`` of its header blob (the file's first ``8 + N`` bytes).
        tensors: ``(name, hex sha256, size)`` of each tensor blob, in the file's data order.
    """

    header: tuple[str, int]
    tensors: tuple[tuple[str, str, int], ...]

    @property
    def size(self) -> int:
        return self.header[1] + sum(size for _, _, size in self.tensors)

    def blobs(self) -> list[tuple[str, int]]:
        """``(hex sha256, size)`` of every blob, the header first."""
        return [self.header, *((sha, size) for _, sha, size in self.tensors)]


def place(blob_path: Callable[[str], Path], source: Path, rel: str, entry: FileEntry,
          work: Path) -> tuple[FileLayout, list[Path]]:
    """Store the module file ``rel`` under ``source`` as a header blob and tensor blobs,
    read once from one descriptor, the whole file hashed against the manifest on the way.

    Returns:
        Its layout, and the blobs this call created (a failed add takes them back).

    Raises:
        IntegrityError: the file changed since it was checked (size, header or bytes).
    """
    created: list[Path] = []
    try:
        return _place(blob_path, source, rel, entry, work, created), created
    except BaseException:
        for blob in created:  # nothing half-stored
            blob.unlink(missing_ok=True)
        raise


def _place(blob_path: Callable[[str], Path], source: Path, rel: str, entry: FileEntry,
           work: Path, created: list[Path]) -> FileLayout:
    whole = hashlib.sha256()
    with open_regular(source, rel) as src:
        if os.fstat(src.fileno()).st_size != entry.size:
            raise IntegrityError(f"{rel} changed while it was being added; add it again")
        prefix = src.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 <= length <= min(entry.size - 8, MAX_SAFETENSORS_HEADER_BYTES):
            raise IntegrityError(f"{rel} changed while it was being added; add it again")
        header = prefix + src.read(length)
        try:
            parsed = parse_safetensors_header(header, entry.size, what=rel)
        except FormatError:
            raise IntegrityError(f"{rel} changed while it was being added; add it again") \
                from None
        whole.update(header)
        header_sha = hashlib.sha256(header).hexdigest()
        if tensors.place_bytes(blob_path(header_sha), header, work):
            created.append(blob_path(header_sha))
        order = sorted(parsed.tensors.items(), key=lambda item: (item[1].begin, item[1].end))
        placed = []
        for name, info in order:
            sha, new = _place_next(blob_path, src, info.end - info.begin, whole, work, rel)
            if new:
                created.append(blob_path(sha))
            placed.append((name, sha, info.end - info.begin))
        if src.read(1) or whole.hexdigest() != entry.sha256:
            raise IntegrityError(f"{rel} changed while it was being added (it no longer "
                                 "matches its sha256 in the manifest); add it again")
    return FileLayout((header_sha, len(header)), tuple(placed))


def _place_next(blob_path: Callable[[str], Path], src: Any, size: int, whole: Any,
                work: Path, rel: str) -> tuple[str, bool]:
    """Copy the next ``size`` bytes of ``src`` to a blob named by their sha256, unless an
    intact blob of that name exists. Returns the sha256 and whether the blob is new."""
    part = work / f"tensor-{uuid.uuid4().hex}.part"
    digest = hashlib.sha256()
    with open(part, "xb") as out:
        if tensors.copy_hashed(src, out, size, digest, whole) != size:
            part.unlink()
            raise IntegrityError(f"{rel} was truncated while it was being added; add it again")
        out.flush()
        os.fsync(out.fileno())
    sha = digest.hexdigest()
    blob = blob_path(sha)
    if tensors.valid_blob(blob, size, sha):
        part.unlink()
        return sha, False
    existed = os.path.lexists(blob)
    os.chmod(part, 0o444)
    blob.parent.mkdir(parents=True, exist_ok=True)
    publish(part, blob)
    return sha, not existed


def write_record(tree: Path, layouts: Mapping[str, FileLayout]) -> None:
    """Write the tree's record of its split files (none: no record)."""
    if not layouts:
        return
    body = {"format": _FORMAT,
            "files": {rel: {"header": list(layout.header),
                            "tensors": [list(t) for t in layout.tensors]}
                      for rel, layout in sorted(layouts.items())}}
    path = tree / RECORD
    path.write_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    os.chmod(path, 0o444)


def read_record(tree: Path, manifest: Manifest) -> dict[str, FileLayout]:
    """The split files of a stored tree, from its record, checked against the manifest: each
    a reference file the manifest lists, its blobs' sizes adding up to the file's size.

    Returns:
        Module path -> layout; empty for a tree without a record (every file whole, as trees
        written before reference files were split).

    Raises:
        IntegrityError: the record is damaged, or does not fit the manifest.
    """
    try:
        f = files.open_regular(tree.resolve() / RECORD, what=RECORD)
    except FileNotFoundError:
        return {}
    with f:
        data = f.read(_MAX_RECORD + 1)
    try:
        body = jsonio.loads(data, what=RECORD, max_bytes=_MAX_RECORD)
        return _layouts(body, manifest)
    except (GraftError, ValueError, TypeError) as exc:
        raise IntegrityError(f"its {RECORD} (where its reference files' tensors are) is "
                             f"damaged: {exc}") from None


def _layouts(body: Any, manifest: Manifest) -> dict[str, FileLayout]:
    if not isinstance(body, dict) or set(body) != {"format", "files"} \
            or body["format"] != _FORMAT or not isinstance(body["files"], dict):
        raise ValueError(f"it is not a {_FORMAT} record")
    out = {}
    for rel, raw in body["files"].items():
        entry = manifest.files.get(rel)
        if entry is None or not is_stored_split(rel):
            raise ValueError(f"it names {str(rel)[:80]!r}, not a reference file of the module")
        if not isinstance(raw, dict) or set(raw) != {"header", "tensors"}:
            raise ValueError(f"its entry for {rel} is malformed")
        items = raw["tensors"]
        if not isinstance(items, list) or len(items) > MAX_SAFETENSORS_TENSORS:
            raise ValueError(f"its entry for {rel} has no list of tensors")
        header = _blob(raw["header"], f"the header of {rel}")
        layout = FileLayout((header[1], header[2]),
                            tuple(_blob(t, f"a tensor of {rel}", named=True) for t in items))
        if layout.size != entry.size:
            raise ValueError(f"its blobs for {rel} add up to {layout.size} bytes, not the "
                             f"{entry.size} the manifest records")
        out[rel] = layout
    return out


def _blob(raw: Any, what: str, *, named: bool = False) -> tuple[str, str, int]:
    """``[name,] sha256, size`` from the record, each checked."""
    if not isinstance(raw, list) or len(raw) != (3 if named else 2):
        raise ValueError(f"{what} is malformed")
    name = raw[0] if named else ""
    sha, size = raw[-2], raw[-1]
    if not isinstance(name, str) or len(name) > 1024:
        raise ValueError(f"{what} has a malformed name")
    if not isinstance(sha, str) or len(sha) != 64 or not set(sha) <= _HEX:
        raise ValueError(f"{what} has a malformed sha256")
    if type(size) is not int or size < 0:
        raise ValueError(f"{what} has a malformed size")
    return name, sha, size


def _read_header(blob_file: Callable[[str], str], layout: FileLayout, rel: str) -> bytes:
    """The header blob's bytes, which must hash to its name."""
    sha, size = layout.header
    buffer = bytearray(size)
    tensors.read_exact(blob_file(sha), size, buffer, f"the header blob of {rel}")
    if hashlib.sha256(buffer).hexdigest() != sha:
        raise IntegrityError(f"the header blob of {rel} does not match its sha256: it was "
                             "altered")
    return bytes(buffer)


def check(blob_file: Callable[[str], str], rel: str, layout: FileLayout, entry: FileEntry,
          recorded: dict[str, Any], level: str, now_ns: Callable[[], int],
          fingerprint: Any) -> dict[str, Any]:
    """Check a split file's blobs (levels as in trees.check_tree): the header blob (bytes)
    hashed always; the tensor blobs' sizes always, their bytes at ``read`` unless a
    fingerprint vouches and at ``full``, where the header is also parsed as ``graft add``
    parses it and the file rebuilt from the blobs must hash to the manifest's ``sha256``.

    Returns:
        Fresh fingerprints of the tensor blobs hashed and found intact.

    Raises:
        IntegrityError / FormatError: a blob is missing, of the wrong size or altered, or the
            header does not describe the recorded tensors.
    """
    entries = [(f"{name} of {rel}", sha, size) for name, sha, size in layout.tensors]
    header = _read_header(blob_file, layout, rel)
    whole = None
    if level == "full":
        parsed = parse_safetensors_header(header, entry.size, what=rel)
        order = sorted(parsed.tensors.items(), key=lambda item: (item[1].begin, item[1].end))
        if [(n, i.end - i.begin) for n, i in order] != [(n, s) for n, _, s in layout.tensors]:
            raise IntegrityError(f"the header of {rel} does not describe the tensors its "
                                 f"{RECORD} records")
        whole = hashlib.sha256(header)
    fresh = tensors.check_blobs(blob_file, entries, recorded, level, now_ns, fingerprint, whole)
    if whole is not None and whole.hexdigest() != entry.sha256:
        raise IntegrityError(f"its {rel}, rebuilt from its blobs, does not match its sha256 "
                             "in the manifest")
    return fresh


def rebuild(blob_path: Callable[[str], Path], rel: str, layout: FileLayout, dest: Path,
            expected_sha256: str) -> None:
    """Write the file ``rel`` to ``dest`` (a new file) from its blobs, byte for byte, checked
    against the manifest's ``sha256`` before it is kept.

    Raises:
        IntegrityError: a blob is missing or damaged (``dest`` is removed).
    """
    header = _read_header(lambda sha: str(blob_path(sha)), layout, rel)
    whole = tensors.Layout(header, layout.header[0], layout.tensors)
    tensors.write_weights(blob_path, whole, dest, expected_sha256, read_only=False, what=rel)
