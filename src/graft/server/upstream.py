"""`graft serve --upstream oci://HOST[:PORT][/NAMESPACE]`: pages and search in front of an
existing OCI registry, which holds the bytes.

The upstream (the CNCF distribution registry, Harbor, a cloud registry) serves every push and
pull; this server only reads it: the catalog, each repository's version tags, each Graft
manifest, its config (parsed by ``Manifest``) and its README.md. It keeps what it read in its
own SQLite index (the same tables a local registry fills) and refreshes it in the background.
Its ``/v2/`` answers 404 with the upstream's address, so no client pushes here by mistake.
Program validation happens where the bytes are: every Graft client validates a module
completely when it pulls it; this index never downloads weights or programs.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from graft.errors import GraftError, RequestRefused
from graft.format import jsonio
from graft.format.manifest import Manifest
from graft.hub.oci import artifact
from graft.hub.oci.client import RegistryClient
from graft.server.config import ServeConfig
from graft.server.db import Database
from graft.server.modules import MAX_CARD, IndexedModule
from graft.server.names import check_repository
from graft.server.registry import index_module, is_version_tag

__all__ = ["UpstreamIndex"]

_log = logging.getLogger("graft.server.upstream")
_MAX_REPOSITORIES = 100_000
_PAGE = 1000  # distribution's largest catalog page


class UpstreamIndex:
    """The module index of an upstream registry.

    Args:
        config: ``config.upstream`` is ``oci://HOST[:PORT][/NAMESPACE]``; the index lives in
            ``config.root``.
    """

    def __init__(self, config: ServeConfig) -> None:
        target = (config.upstream or "").removeprefix("oci://").strip("/")
        self.registry_host, _, self.prefix = target.partition("/")
        if not self.registry_host:
            raise GraftError(f"--upstream {config.upstream!r} names no host; use "
                             "oci://HOST[:PORT][/NAMESPACE]")
        config.root.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.db = Database(config.database)

    async def start(self) -> asyncio.Task[None]:
        """Index the upstream once (before the first request), then keep refreshing."""
        await run_in_threadpool(self.refresh)

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.config.refresh_seconds)
                await run_in_threadpool(self.refresh)

        return asyncio.create_task(loop())

    async def refuse_v2(self, request: Request) -> Response:
        message = (f"this server shows pages and search for oci://{self.registry_host}; push "
                   "and pull there")
        return JSONResponse({"errors": [{"code": "NAME_UNKNOWN", "message": message,
                                         "detail": {}}]}, status_code=404)

    def refresh(self) -> int:
        """Read the upstream's Graft modules into the index; return how many are new."""
        added = 0
        try:
            with RegistryClient(self.registry_host) as client:
                for repo in self._repositories(client):
                    added += self._refresh_repository(client, repo)
        except GraftError as exc:  # the upstream is down or refuses: keep serving the index
            _log.warning("refreshing from %s failed: %s", self.registry_host, exc)
        return added

    def _repositories(self, client: RegistryClient) -> list[str]:
        names: list[Any] = []
        last = ""
        for _ in range(_MAX_REPOSITORIES // _PAGE):  # bounded: pages of the catalog
            params = {"n": str(_PAGE), **({"last": last} if last else {})}
            response = client.request("GET", "/v2/_catalog", scope="registry:catalog:*",
                                      params=params)
            body = jsonio.loads(response.content, what="the upstream catalog",
                                max_bytes=16 << 20)
            page = body.get("repositories") if isinstance(body, dict) else None
            if not isinstance(page, list) or not page:
                break
            names += page
            if "link" not in response.headers or not isinstance(page[-1], str):
                break
            last = page[-1]
        out = []
        for name in names:
            if not isinstance(name, str):
                continue
            if self.prefix and not name.startswith(self.prefix + "/"):
                continue
            try:
                out.append(check_repository(name))
            except RequestRefused:
                continue  # a repository this server's pages could not address
        return out

    def _refresh_repository(self, client: RegistryClient, repo: str) -> int:
        scope = f"repository:{repo}:pull"
        response = client.request("GET", f"/v2/{repo}/tags/list", scope=scope, allow=(404,))
        if response.status_code == 404:
            return 0
        body = jsonio.loads(response.content, what=f"the tags of {repo}", max_bytes=16 << 20)
        tags = body.get("tags") if isinstance(body, dict) else None
        added = 0
        for tag in tags if isinstance(tags, list) else []:
            if not isinstance(tag, str) or not is_version_tag(tag):
                continue
            if self.db.row("SELECT 1 FROM modules WHERE repo = ? AND version = ?", repo,
                           tag.replace("_", "+")) is not None:
                continue  # versions are immutable: indexed once
            try:
                added += self._index_tag(client, repo, tag)
            except (GraftError, RequestRefused) as exc:
                _log.warning("skipping %s:%s from %s: %s", repo, tag, self.registry_host, exc)
        return added

    def _index_tag(self, client: RegistryClient, repo: str, tag: str) -> int:
        scope = f"repository:{repo}:pull"
        response = client.request("GET", f"/v2/{repo}/manifests/{tag}", scope=scope,
                                  headers={"Accept": artifact.MANIFEST_TYPE})
        data = response.content
        body = jsonio.loads(data, what=f"the manifest of {repo}:{tag}",
                            max_bytes=artifact.MAX_MANIFEST)
        if not isinstance(body, dict) or body.get("artifactType") != artifact.ARTIFACT_TYPE:
            return 0  # not a Graft module: the pages list modules only
        plan = artifact.parse_manifest(data, f"the manifest of {repo}:{tag}")
        config = self._blob(client, repo, plan.config, artifact.MAX_CONFIG)
        manifest = Manifest.from_json(jsonio.loads(config, what=f"graft.json of {repo}:{tag}",
                                                   max_bytes=artifact.MAX_CONFIG))
        if manifest.canonical() != config or tag.replace("_", "+") != manifest.version:
            raise GraftError(f"{repo}:{tag} has a config that is not the canonical graft.json "
                             "of its version")
        plan.check(manifest)
        card = ""
        if "README.md" in plan.files:
            card = self._blob(client, repo, plan.files["README.md"], MAX_CARD).decode(
                "utf-8", errors="replace")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with self.db.write() as conn:
            index_module(conn, repo, digest, IndexedModule(manifest, card))
            conn.execute("INSERT OR IGNORE INTO manifests (repo, digest, media_type, "
                         "artifact_type, subject, size, annotations, created) VALUES "
                         "(?, ?, ?, ?, ?, ?, '{}', datetime('now'))",
                         (repo, digest, artifact.MANIFEST_TYPE, artifact.ARTIFACT_TYPE,
                          plan.subject.digest if plan.subject else None, len(data)))
        return 1

    def _blob(self, client: RegistryClient, repo: str, descriptor: Any, limit: int) -> bytes:
        if descriptor.size > limit:
            raise GraftError(f"blob {descriptor.digest} of {repo} is over {limit} bytes")
        response = client.request("GET", f"/v2/{repo}/blobs/{descriptor.digest}",
                                  scope=f"repository:{repo}:pull")
        data = response.content
        if len(data) != descriptor.size or \
                "sha256:" + hashlib.sha256(data).hexdigest() != descriptor.digest:
            raise GraftError(f"blob {descriptor.digest} of {repo} does not match its digest")
        return data
