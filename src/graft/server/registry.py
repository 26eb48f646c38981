"""The registry's state transitions: uploads, mounts, manifest pushes, tags, yanks.

Every transition writes bytes first (a blob file, fsynced and renamed into ``blobs/``) and
then the rows that make them visible, in one immediate transaction. Named stop points
(``graft._testing``) sit between those steps so the tests can SIGKILL the server there.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
import uuid
from dataclasses import dataclass
from typing import Any

from graft._testing import stop_point
from graft.errors import FormatError, RequestRefused
from graft.format import jsonio
from graft.format.manifest import validate_version
from graft.hub.oci.artifact import Descriptor
from graft.server.blobs import BlobFiles
from graft.server.config import ServeConfig
from graft.server.db import Database, now
from graft.server.modules import IndexedModule, check_graft_artifact, is_graft
from graft.server.names import check_digest, check_tag, namespace_of

__all__ = ["MAX_MANIFEST", "PutResult", "Registry", "index_module", "is_version_tag",
           "version_key"]

#: The largest manifest accepted (distribution's own limit).
MAX_MANIFEST = 4 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_IMAGE_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
_INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
LATEST = "latest"
_VERSION_PARTS = re.compile(r"(\d+(?:\.\d+){0,2})(?:-([^+]*))?(?:\+.*)?")


@dataclass(frozen=True)
class PutResult:
    digest: str
    subject: str | None


def is_version_tag(tag: str) -> bool:
    """Whether a tag names a version (``1.0.0``; ``+`` is written ``_`` in tags): immutable."""
    try:
        validate_version(tag.replace("_", "+"))
    except FormatError:
        return False
    return True


def version_key(version: str) -> tuple[Any, ...]:
    """Sort key of a Graft version: numbers numerically, a ``-pre`` release before its release."""
    match = _VERSION_PARTS.fullmatch(version)
    if match is None:
        return (-1, -1, -1, 0, version)
    numbers = [int(p) for p in match.group(1).split(".")]
    numbers += [0] * (3 - len(numbers))
    pre = match.group(2)
    return (*numbers, 0 if pre else 1, pre or "")


def _invalid(message: str) -> RequestRefused:
    return RequestRefused(400, "MANIFEST_INVALID", message)


class Registry:
    """The bytes and metadata of one server root.

    Args:
        config: The server's configuration.
    """

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        config.root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobFiles(config.root, config.max_upload)
        self.db = Database(config.database)
        self.scratch = config.root / "scratch"
        shutil.rmtree(self.scratch, ignore_errors=True)  # module checks a crash left behind
        self.scratch.mkdir()
        live = {r[0] for r in self.db.rows("SELECT id FROM uploads")}
        self.blobs.reap(live)
        # Sessions whose file the reaper removed (abandoned for a day) end with it.
        gone = [(u,) for u in live if not self.blobs.upload_path(u).exists()]
        if gone:
            with self.db.write() as conn:
                conn.executemany("DELETE FROM uploads WHERE id = ?", gone)

    # -- reading ----------------------------------------------------------------------------

    def repositories(self, namespace: str | None = None) -> list[str]:
        """Repositories with a manifest, in public namespaces or in ``namespace``."""
        rows = self.db.rows(
            "SELECT DISTINCT m.repo FROM manifests m WHERE NOT EXISTS (SELECT 1 FROM "
            "namespaces n WHERE n.private = 1 AND n.name = substr(m.repo, 1, "
            "instr(m.repo, '/') - 1) AND n.name IS NOT ?) ORDER BY m.repo", namespace)
        return [r[0] for r in rows]

    def resolve(self, repo: str, reference: str) -> sqlite3.Row:
        """The manifest row a tag or digest names in ``repo``.

        Raises:
            RequestRefused: 404 ``MANIFEST_UNKNOWN``.
        """
        if reference.startswith("sha256:"):
            digest: str | None = check_digest(reference)
        else:
            digest = self.db.tag(repo, check_tag(reference))
            if digest is None and reference == LATEST:
                digest = self.latest_manifest(repo)
        row = self.db.manifest(repo, digest) if digest else None
        if row is None:
            raise RequestRefused(404, "MANIFEST_UNKNOWN", f"{repo} has no manifest "
                                 f"{reference[:80]!r}")
        return row

    def latest_manifest(self, repo: str) -> str | None:
        """The manifest of the highest version of ``repo`` that is not yanked."""
        rows = self.db.rows("SELECT version, manifest FROM modules WHERE repo = ? AND yanked = 0",
                            repo)
        if not rows:
            return None
        return max(rows, key=lambda r: version_key(r["version"]))["manifest"]

    def tags(self, repo: str, last: str, limit: int) -> list[str]:
        if self.db.row("SELECT 1 FROM manifests WHERE repo = ? LIMIT 1", repo) is None:
            raise RequestRefused(404, "NAME_UNKNOWN", f"repository {repo} is not known")
        rows = self.db.rows("SELECT tag FROM tags WHERE repo = ? AND tag > ? ORDER BY tag "
                            "LIMIT ?", repo, last, limit)
        return [r[0] for r in rows]

    def referrers(self, repo: str, digest: str, artifact_type: str | None) -> dict[str, Any]:
        """The OCI image index of the manifests in ``repo`` whose subject is ``digest``."""
        rows = self.db.rows("SELECT * FROM manifests WHERE repo = ? AND subject = ? "
                            "ORDER BY created, digest", repo, digest)
        manifests = []
        for row in rows:
            if artifact_type and row["artifact_type"] != artifact_type:
                continue
            entry: dict[str, Any] = {"mediaType": row["media_type"], "digest": row["digest"],
                                     "size": row["size"]}
            if row["artifact_type"]:
                entry["artifactType"] = row["artifact_type"]
            annotations = json.loads(row["annotations"])
            if annotations:
                entry["annotations"] = annotations
            manifests.append(entry)
        return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}

    # -- uploads ----------------------------------------------------------------------------

    def start_upload(self, repo: str) -> str:
        upload = uuid.uuid4().hex
        self.blobs.start(upload)  # the file first: a row never names a missing file
        with self.db.write() as conn:
            conn.execute("INSERT INTO uploads (id, repo, created) VALUES (?, ?, ?)",
                         (upload, repo, now()))
        return upload

    def session(self, repo: str, upload: str) -> None:
        row = self.db.row("SELECT repo FROM uploads WHERE id = ?", upload)
        if row is None or row[0] != repo:
            raise RequestRefused(404, "BLOB_UPLOAD_UNKNOWN", f"upload {upload} is unknown in "
                                 f"{repo}, or was finished or cancelled; start a new one")

    def cancel_upload(self, upload: str) -> None:
        with self.db.write() as conn:
            conn.execute("DELETE FROM uploads WHERE id = ?", (upload,))
        self.blobs.drop(upload)

    def finish_upload(self, repo: str, upload: str, digest: str) -> None:
        """Verify a session's bytes, move them to ``blobs/``, then link them to ``repo``."""
        size = self.blobs.commit(upload, digest)
        with self.db.write() as conn:
            conn.execute("INSERT OR IGNORE INTO blobs (digest, size) VALUES (?, ?)",
                         (digest, size))
            conn.execute("INSERT OR IGNORE INTO repo_blobs (repo, digest) VALUES (?, ?)",
                         (repo, digest))
            conn.execute("DELETE FROM uploads WHERE id = ?", (upload,))

    def mount(self, repo: str, digest: str, source: str) -> bool:
        """Link a blob of ``source`` into ``repo`` without its bytes; False if it is not there."""
        if self.db.blob_in_repo(source, digest) is None:
            return False
        with self.db.write() as conn:
            conn.execute("INSERT OR IGNORE INTO repo_blobs (repo, digest) VALUES (?, ?)",
                         (repo, digest))
        return True

    # -- manifests --------------------------------------------------------------------------

    def put_manifest(self, repo: str, reference: str, data: bytes,
                     content_type: str | None) -> PutResult:
        """Accept a manifest pushed under a tag or its digest.

        Raises:
            RequestRefused: 400 for a malformed manifest, one naming blobs or manifests that
                are not in ``repo``, or a Graft module that is refused; 409 when a version tag
                or module version already names other content.
        """
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        tag = None
        if reference.startswith("sha256:"):
            if check_digest(reference) != digest:
                raise RequestRefused(400, "DIGEST_INVALID", f"the manifest's bytes hash to "
                                     f"{digest}, not {reference}")
        else:
            tag = check_tag(reference)
        try:
            body = jsonio.loads(data, what="the manifest", max_bytes=MAX_MANIFEST)
        except FormatError as exc:
            raise _invalid(str(exc)) from None
        if not isinstance(body, dict) or body.get("schemaVersion") != 2:
            raise _invalid("the manifest is not a JSON object with schemaVersion 2")
        media = self._media_type(body, content_type)
        subject = self._check_references(repo, body, media)
        indexed: IndexedModule | None = None
        if media == OCI_MANIFEST and is_graft(body):
            indexed = check_graft_artifact(data, self.blobs.path, self.scratch)
            version = indexed.manifest.version
            if tag and is_version_tag(tag) and tag.replace("_", "+") != version:
                raise _invalid(f"tag {tag!r} names a module whose graft.json says version "
                               f"{version!r}; push it as :{version.replace('+', '_')}")
        artifact_type = body.get("artifactType")
        if not isinstance(artifact_type, str) and isinstance(body.get("config"), dict):
            artifact_type = body["config"].get("mediaType")
        annotations = body.get("annotations") if isinstance(body.get("annotations"), dict) else {}
        self.blobs.put_bytes(digest, data)
        stop_point("serve.manifest-bytes-written")
        with self.db.write() as conn:
            if tag is not None:
                self._set_tag(conn, repo, tag, digest)
            # A module becomes a version of the repository when pushed under a version tag;
            # pushed by digest (a parent copied beside its child, as the subject of the
            # child's manifest) it is stored and checked, but lists as no version here.
            if indexed is not None and tag is not None and is_version_tag(tag):
                self._index(conn, repo, digest, indexed)
            conn.execute("INSERT OR IGNORE INTO manifests (repo, digest, media_type, "
                         "artifact_type, subject, size, annotations, created) VALUES "
                         "(?, ?, ?, ?, ?, ?, ?, ?)",
                         (repo, digest, media, artifact_type if isinstance(artifact_type, str)
                          else None, subject, len(data), json.dumps(annotations), now()))
            stop_point("serve.manifest-before-commit")
        return PutResult(digest, subject)

    def _media_type(self, body: dict[str, Any], content_type: str | None) -> str:
        declared = body.get("mediaType")
        header = (content_type or "").split(";")[0].strip() or None
        media = declared or header
        if declared and header and declared != header:
            raise _invalid(f"the manifest says mediaType {str(declared)[:80]!r} but was sent "
                           f"as Content-Type {header[:80]!r}")
        if media not in (*_IMAGE_TYPES, *_INDEX_TYPES):
            raise _invalid(f"manifest media type {str(media)[:80]!r} is not supported; send an "
                           f"OCI image manifest or index ({OCI_MANIFEST}, {OCI_INDEX})")
        return str(media)

    def _check_references(self, repo: str, body: dict[str, Any], media: str) -> str | None:
        """Refuse a manifest that names blobs or manifests ``repo`` does not hold; return
        its subject's digest."""
        try:
            if media in _IMAGE_TYPES:
                blobs = [Descriptor.from_json(body.get("config"), "config")]
                layers = body.get("layers", [])
                if not isinstance(layers, list):
                    raise FormatError("layers is not a list")
                blobs += [Descriptor.from_json(d, f"layer {i}") for i, d in enumerate(layers)]
                children = []
            else:
                entries = body.get("manifests", [])
                if not isinstance(entries, list):
                    raise FormatError("manifests is not a list")
                blobs = []
                children = [Descriptor.from_json(d, f"manifest {i}")
                            for i, d in enumerate(entries)]
            subject = (Descriptor.from_json(body["subject"], "subject")
                       if body.get("subject") is not None else None)
        except FormatError as exc:
            raise _invalid(f"the manifest is malformed: {exc}") from None
        for d in blobs:
            size = self.db.blob_in_repo(repo, d.digest)
            if size is None:
                raise RequestRefused(400, "MANIFEST_BLOB_UNKNOWN", f"the manifest names blob "
                                     f"{d.digest}, which was never uploaded to {repo}; upload "
                                     "(or mount) every blob before the manifest")
            if size != d.size:
                raise RequestRefused(400, "SIZE_INVALID", f"the manifest gives blob {d.digest} "
                                     f"size {d.size}, but it is {size} bytes")
        for d in children:
            row = self.db.manifest(repo, d.digest)
            if row is None:
                raise RequestRefused(400, "MANIFEST_UNKNOWN", f"the index names manifest "
                                     f"{d.digest}, which is not in {repo}; push it first")
            if row["size"] != d.size:
                raise RequestRefused(400, "SIZE_INVALID", f"the index gives manifest "
                                     f"{d.digest} size {d.size}, but it is {row['size']} bytes")
        return subject.digest if subject else None

    def _set_tag(self, conn: sqlite3.Connection, repo: str, tag: str, digest: str) -> None:
        row = conn.execute("SELECT digest FROM tags WHERE repo = ? AND tag = ?",
                           (repo, tag)).fetchone()
        if row is not None and row[0] == digest:
            return
        if row is not None:
            if is_version_tag(tag):
                raise RequestRefused(409, "DENIED", f"{repo}:{tag} already names {row[0]}; a "
                                     "version is immutable, so push the new content as a new "
                                     "version")
            conn.execute("UPDATE tags SET digest = ? WHERE repo = ? AND tag = ?",
                         (digest, repo, tag))
        else:
            conn.execute("INSERT INTO tags (repo, tag, digest) VALUES (?, ?, ?)",
                         (repo, tag, digest))
        conn.execute("INSERT INTO tag_events (repo, tag, digest, event, at) VALUES "
                     "(?, ?, ?, ?, ?)", (repo, tag, digest, "move" if row else "push", now()))

    def _index(self, conn: sqlite3.Connection, repo: str, digest: str,
               indexed: IndexedModule) -> None:
        index_module(conn, repo, digest, indexed)

    # -- yanks ------------------------------------------------------------------------------

    def yank(self, repo: str, version: str, yanked: bool = True) -> str:
        """Hide a version from ``latest`` (or show it again); it stays pullable by digest.

        Raises:
            RequestRefused: 404 when ``repo`` has no such module version.
        """
        with self.db.write() as conn:
            row = conn.execute("SELECT manifest FROM modules WHERE repo = ? AND version = ?",
                               (repo, version)).fetchone()
            if row is None:
                raise RequestRefused(404, "MANIFEST_UNKNOWN", f"{repo} has no module version "
                                     f"{version[:80]!r}")
            conn.execute("UPDATE modules SET yanked = ? WHERE repo = ? AND version = ?",
                         (int(yanked), repo, version))
            conn.execute("INSERT INTO tag_events (repo, tag, digest, event, at) VALUES "
                         "(?, ?, ?, ?, ?)", (repo, version.replace("+", "_"), row[0],
                                             "yank" if yanked else "unyank", now()))
        return str(row[0])

    def namespace_private(self, repo: str) -> bool:
        return self.db.is_private(namespace_of(repo))


def index_module(conn: sqlite3.Connection, repo: str, digest: str,
                 indexed: IndexedModule) -> None:
    """Record a module version of ``repo`` for search and pages (inside the caller's
    transaction); a version that already names another manifest is refused with 409."""
    m = indexed.manifest
    row = conn.execute("SELECT manifest FROM modules WHERE repo = ? AND version = ?",
                       (repo, m.version)).fetchone()
    if row is not None:
        if row[0] != digest:
            raise RequestRefused(409, "DENIED", f"{repo} already has version {m.version} "
                                 f"({row[0]}); a version is immutable, so push the new "
                                 "content as a new version")
        return
    conn.execute("INSERT INTO modules (repo, version, manifest, module_digest, name, "
                 "description, license, card, config, created) VALUES "
                 "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (repo, m.version, digest, m.digest, m.name, m.description, m.license,
                  indexed.card, m.canonical().decode("utf-8"), now()))
    conn.executemany("INSERT INTO module_signatures (repo, version, signature, inputs, "
                     "outputs) VALUES (?, ?, ?, ?, ?)",
                     [(repo, m.version, *s) for s in indexed.signatures])
    conn.executemany("INSERT INTO module_parents (repo, version, handle, digest) VALUES "
                     "(?, ?, ?, ?)", [(repo, m.version, p.handle, p.digest)
                                      for p in m.parents])
