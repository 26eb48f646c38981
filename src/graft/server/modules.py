"""Graft-aware pushes: a manifest with Graft's ``artifactType`` is checked as a module.

The registry stays generic OCI for any artifact. A manifest whose ``artifactType`` is
``application/vnd.graft.module.v1+json`` (see docs/registry.md) is, before it is accepted:

1. read as a Graft artifact by the client's own mapping (``graft.hub.oci.artifact``), so the
   server and every client agree on what a module's layers are;
2. its config blob read with the strict JSON reader and parsed by ``Manifest`` (the validated
   reader of ``graft.json``; nothing else), and required to be the canonical bytes, so the
   config digest is the module digest;
3. its layers matched file for file and tensor for tensor against that manifest;
4. assembled into a module directory in the server's scratch space and put through
   ``graft.format.validate.check_module``, the same entry check a module passes on entering
   a local store: every file hashed, code and pickles refused, programs validated. A module
   that check refuses is refused at push (400), never at pull.

What the push then indexes (name, description, signatures' specs, parents, model card) comes
from the validated manifest only.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from graft.errors import FormatError, GraftError, RequestRefused
from graft.format import jsonio
from graft.format.manifest import Manifest
from graft.format.validate import check_module
from graft.hub.oci import artifact

__all__ = ["ARTIFACT_TYPE", "IndexedModule", "assemble", "check_graft_artifact", "is_graft"]

ARTIFACT_TYPE = artifact.ARTIFACT_TYPE
#: The longest model card (README.md) the server renders, in bytes.
MAX_CARD = 1 << 20
_CARD = "README.md"


@dataclass(frozen=True)
class IndexedModule:
    """What the index records of one pushed module version."""

    manifest: Manifest
    card: str

    @property
    def signatures(self) -> list[tuple[str, str, str]]:
        """``(signature, inputs, outputs)`` with each spec written ``name: dtype[dims]``."""
        return [(key, ", ".join(f"{k}: {v}" for k, v in spec.inputs.items()),
                 ", ".join(f"{k}: {v}" for k, v in spec.outputs.items()))
                for key, spec in self.manifest.signatures.items()]


def is_graft(body: dict) -> bool:
    """Whether an (already JSON-parsed) manifest claims to be a Graft module."""
    config = body.get("config")
    return (body.get("artifactType") == ARTIFACT_TYPE
            or (isinstance(config, dict) and config.get("mediaType") == artifact.CONFIG_TYPE))


def _refused(message: str) -> RequestRefused:
    return RequestRefused(400, "MANIFEST_INVALID", message)


def check_graft_artifact(data: bytes, blob_path: Callable[[str], Path],
                         scratch: Path) -> IndexedModule:
    """Check a pushed Graft manifest whose blobs are all present; return what to index.

    Args:
        data: The OCI manifest bytes.
        blob_path: The file of a blob digest (every digest the manifest names exists).
        scratch: A directory on the blobs' file system for the assembled module.

    Raises:
        RequestRefused: 400 with the reason the artifact or the module is refused.
    """
    try:
        plan = artifact.parse_manifest(data, "the pushed manifest")
        config_path = blob_path(plan.config.digest)
        if config_path.stat().st_size > artifact.MAX_CONFIG:
            raise FormatError("the config blob is over the graft.json size limit")
        config = config_path.read_bytes()
        manifest = Manifest.from_json(jsonio.loads(config, what="the config blob (graft.json)",
                                                   max_bytes=artifact.MAX_CONFIG))
        if manifest.canonical() != config:
            raise FormatError("the config blob is not the canonical graft.json of the module "
                              "it describes; push the bytes `Manifest.canonical()` gives")
        plan.check(manifest)
        directory = scratch / f"module-{uuid.uuid4().hex}"
        try:
            assemble(plan, blob_path, directory)
            check_module(directory, manifest, hash_contents=True)
            card = _card(directory, manifest)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    except RequestRefused:
        raise
    except GraftError as exc:
        raise _refused(f"the pushed Graft module is refused: {exc}") from None
    return IndexedModule(manifest, card)


def assemble(plan: artifact.Plan, blob_path: Callable[[str], Path], directory: Path) -> None:
    """Lay the artifact's blobs out as a module directory (links where possible)."""
    directory.mkdir(parents=True)
    for rel, descriptor in plan.files.items():
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(blob_path(descriptor.digest), target)
    for rel, split in plan.tensor_files.items():
        # A safetensors file is its header blob and its tensor blobs back to back.
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as out:
            for descriptor in [split.header, *(d for _, d in split.tensors)]:
                with open(blob_path(descriptor.digest), "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
    (directory / "graft.json").write_bytes(blob_path(plan.config.digest).read_bytes())


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _card(directory: Path, manifest: Manifest) -> str:
    if _CARD not in manifest.files:
        return ""
    with open(directory / _CARD, "rb") as f:
        raw = f.read(MAX_CARD + 1)
    if len(raw) > MAX_CARD:
        raw = raw[:MAX_CARD]
    return raw.decode("utf-8", errors="replace")
