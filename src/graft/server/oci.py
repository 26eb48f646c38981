"""The OCI distribution API (v1.1): what `graft push/pull`, skopeo and any OCI client speak.

Routes (``NAME`` is ``NAMESPACE/NAME[/...]``, checked by :mod:`graft.server.names`)::

    GET          /v2/                                   ping (401 + challenge without a token)
    GET          /v2/token                              Docker token flow: token for Basic creds
    GET          /v2/_catalog                           public repositories
    GET, HEAD    /v2/NAME/manifests/REFERENCE           by tag or digest
    PUT          /v2/NAME/manifests/REFERENCE           push (Graft modules are checked first)
    GET, HEAD    /v2/NAME/blobs/DIGEST                  Range requests answered with 206
    POST         /v2/NAME/blobs/uploads/                session, monolithic (?digest=), mount
    GET, PATCH, PUT, DELETE /v2/NAME/blobs/uploads/ID   chunked upload, finish, cancel
    GET          /v2/NAME/tags/list                     ?n=&last= pagination
    GET          /v2/NAME/referrers/DIGEST              OCI 1.1 referrers, ?artifactType=

Deleting manifests, tags and blobs is refused (405): history is never rewritten; a version
is withdrawn by yanking it (:mod:`graft.server.api`).
"""

from __future__ import annotations

import re
from typing import Awaitable, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from graft.errors import RequestRefused
from graft.server import auth
from graft.server.names import check_digest, check_repository, check_upload_id
from graft.server.registry import MAX_MANIFEST, Registry

__all__ = ["OciApi", "error_response"]

_ROUTES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(?P<name>.+)/manifests/(?P<reference>[^/]+)$"), "manifest"),
    (re.compile(r"^(?P<name>.+)/blobs/uploads/?$"), "uploads"),
    (re.compile(r"^(?P<name>.+)/blobs/uploads/(?P<upload>[^/]+)$"), "upload"),
    (re.compile(r"^(?P<name>.+)/blobs/(?P<digest>[^/]+)$"), "blob"),
    (re.compile(r"^(?P<name>.+)/tags/list$"), "tags"),
    (re.compile(r"^(?P<name>.+)/referrers/(?P<digest>[^/]+)$"), "referrers"),
]
_CONTENT_RANGE = re.compile(r"^(?:bytes[ =])?(\d+)-(\d+)$")
_DEFAULT_PAGE = 1000


def error_response(exc: RequestRefused, request: Request, *,
                   scope: str | None = None) -> Response:
    """The OCI error body (``{"errors": [...]}``), with a challenge on 401."""
    headers = {}
    if exc.status == 401:
        realm = f"{str(request.base_url).rstrip('/')}/v2/token"
        challenge = f'Bearer realm="{realm}",service="graft-serve"'
        if scope:
            challenge += f',scope="{scope}"'
        headers["WWW-Authenticate"] = challenge
    body = {"errors": [{"code": exc.code, "message": str(exc), "detail": {}}]}
    return JSONResponse(body, status_code=exc.status, headers=headers)


class OciApi:
    """The ``/v2/`` endpoints over one :class:`Registry`."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.db = registry.db
        self._handlers = {"manifest": self._manifest, "uploads": self._uploads,
                          "upload": self._upload, "blob": self._blob, "tags": self._tags,
                          "referrers": self._referrers}

    async def __call__(self, request: Request) -> Response:
        path = request.path_params.get("path", "")
        scope = None
        try:
            if path in ("", "/"):
                return await self._ping(request)
            if path == "token":
                return await self._token(request)
            if path == "_catalog":
                return await self._catalog(request)
            for pattern, kind in _ROUTES:
                match = pattern.match(path)
                if match:
                    params = match.groupdict()
                    name = check_repository(params.pop("name"))
                    reading = request.method in ("GET", "HEAD")
                    scope = f"repository:{name}:{'pull' if reading else 'pull,push'}"
                    handler: Callable[..., Awaitable[Response]] = self._handlers[kind]
                    return await handler(request, name, **params)
            raise RequestRefused(404, "NAME_UNKNOWN", f"no OCI endpoint at /v2/{path[:200]}")
        except RequestRefused as exc:
            return error_response(exc, request, scope=scope)

    def _authorize(self, request: Request, name: str, action: str) -> auth.Grant | None:
        return auth.authorize(self.db, request.headers.get("authorization"), name, action)

    # -- ping, token, catalog ---------------------------------------------------------------

    async def _ping(self, request: Request) -> Response:
        token = auth.Credentials.token(request.headers.get("authorization"))
        if token is None:
            raise RequestRefused(401, "UNAUTHORIZED", "authenticate with a token, or ask the "
                                 "token endpoint anonymously for public pulls")
        auth.parse_token(self.db, token)
        return JSONResponse({}, headers=_API_VERSION)

    async def _token(self, request: Request) -> Response:
        token = auth.Credentials.token(request.headers.get("authorization"))
        if token is None:
            token = auth.ANONYMOUS
        else:
            auth.parse_token(self.db, token)
        # The secret goes back only in this body, which no log records.
        return JSONResponse({"token": token, "access_token": token, "expires_in": 3600})

    async def _catalog(self, request: Request) -> Response:
        grant = None
        token = auth.Credentials.token(request.headers.get("authorization"))
        if token:
            grant = auth.parse_token(self.db, token)
        names = self.registry.repositories(grant.namespace if grant else None)
        return JSONResponse({"repositories": names})

    # -- manifests --------------------------------------------------------------------------

    async def _manifest(self, request: Request, name: str, reference: str) -> Response:
        if request.method in ("GET", "HEAD"):
            self._authorize(request, name, "pull")
            row = self.registry.resolve(name, reference)
            headers = {"Docker-Content-Digest": row["digest"], **_API_VERSION}
            if request.method == "HEAD":
                headers["Content-Length"] = str(row["size"])
                return Response(status_code=200, headers=headers, media_type=row["media_type"])
            data = self.registry.blobs.path(row["digest"]).read_bytes()
            return Response(data, headers=headers, media_type=row["media_type"])
        if request.method == "PUT":
            self._authorize(request, name, "push")
            data = await _read_bounded(request, MAX_MANIFEST, "manifest")
            result = await run_in_threadpool(self.registry.put_manifest, name, reference, data,
                                             request.headers.get("content-type"))
            headers = {"Location": f"/v2/{name}/manifests/{result.digest}",
                       "Docker-Content-Digest": result.digest}
            if result.subject:
                headers["OCI-Subject"] = result.subject
            return Response(status_code=201, headers=headers)
        raise _unsupported("manifests and tags are never deleted; yank a version instead")

    # -- blobs ------------------------------------------------------------------------------

    async def _blob(self, request: Request, name: str, digest: str) -> Response:
        if request.method not in ("GET", "HEAD"):
            raise _unsupported("blobs are never deleted")
        check_digest(digest)
        self._authorize(request, name, "pull")
        size = self.db.blob_in_repo(name, digest)
        if size is None:
            raise RequestRefused(404, "BLOB_UNKNOWN", f"blob {digest} is not in {name}")
        headers = {"Docker-Content-Digest": digest, "Accept-Ranges": "bytes",
                   "Cache-Control": "public, max-age=31536000, immutable"}
        return FileResponse(self.registry.blobs.path(digest), headers=headers,
                            media_type="application/octet-stream")

    async def _uploads(self, request: Request, name: str) -> Response:
        if request.method != "POST":
            raise _unsupported("start an upload with POST")
        self._authorize(request, name, "push")
        query = request.query_params
        mount, source = query.get("mount"), query.get("from")
        if mount and source:
            digest = check_digest(mount)
            if await run_in_threadpool(self._mount, request, name, digest,
                                       check_repository(source)):
                return _created(name, digest)
        upload = await run_in_threadpool(self.registry.start_upload, name)
        if "digest" in query:  # monolithic: the whole blob in this request
            digest = check_digest(query["digest"])
            return await self._finish(request, name, upload, digest)
        return _accepted(name, upload, 0)

    def _mount(self, request: Request, name: str, digest: str, source: str) -> bool:
        try:
            self._authorize(request, source, "pull")
        except RequestRefused:
            return False  # per the spec, an unmountable blob falls back to an upload
        return self.registry.mount(name, digest, source)

    async def _upload(self, request: Request, name: str, upload: str) -> Response:
        check_upload_id(upload)
        self._authorize(request, name, "pull" if request.method == "GET" else "push")
        self.registry.session(name, upload)
        files = self.registry.blobs
        if request.method == "GET":
            return _accepted(name, upload, files.offset(upload), status=204)
        if request.method == "DELETE":
            await run_in_threadpool(self.registry.cancel_upload, upload)
            return Response(status_code=204)
        if request.method == "PATCH":
            declared = _declared_length(request, files.offset(upload), name, upload)
            size = await files.append(upload, request.stream(), declared)
            return _accepted(name, upload, size)
        if request.method == "PUT":
            digest = check_digest(request.query_params.get("digest", ""))
            return await self._finish(request, name, upload, digest)
        raise _unsupported(f"{request.method} is not an upload method")

    async def _finish(self, request: Request, name: str, upload: str, digest: str) -> Response:
        files = self.registry.blobs
        try:
            declared = _content_length(request)
            await files.append(upload, request.stream(), declared)
            await run_in_threadpool(self.registry.finish_upload, name, upload, digest)
        except RequestRefused as exc:
            if exc.status != 416:  # a busy session is another request's, left as it is
                await run_in_threadpool(self.registry.cancel_upload, upload)
            raise
        return _created(name, digest)

    # -- listings ---------------------------------------------------------------------------

    async def _tags(self, request: Request, name: str) -> Response:
        self._authorize(request, name, "pull")
        n = _int_param(request, "n", _DEFAULT_PAGE)
        last = request.query_params.get("last", "")
        tags = self.registry.tags(name, last, n + 1)
        headers = {}
        if len(tags) > n:
            tags = tags[:n]
            headers["Link"] = f'</v2/{name}/tags/list?n={n}&last={tags[-1]}>; rel="next"'
        return JSONResponse({"name": name, "tags": tags}, headers=headers)

    async def _referrers(self, request: Request, name: str,
                         digest: str) -> Response:
        check_digest(digest)
        self._authorize(request, name, "pull")
        kind = request.query_params.get("artifactType")
        body = self.registry.referrers(name, digest, kind)
        headers = {"OCI-Filters-Applied": "artifactType"} if kind else {}
        return JSONResponse(body, headers=headers,
                            media_type="application/vnd.oci.image.index.v1+json")


_API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


def _unsupported(message: str) -> RequestRefused:
    return RequestRefused(405, "UNSUPPORTED", message)


def _created(name: str, digest: str) -> Response:
    return Response(status_code=201, headers={"Location": f"/v2/{name}/blobs/{digest}",
                                              "Docker-Content-Digest": digest})


def _accepted(name: str, upload: str, size: int, status: int = 202) -> Response:
    return Response(status_code=status, headers={
        "Location": f"/v2/{name}/blobs/uploads/{upload}",
        "Range": f"0-{max(size - 1, 0)}",
        "Docker-Upload-UUID": upload,
        "Content-Length": "0",
    })


def _int_param(request: Request, key: str, default: int) -> int:
    text = request.query_params.get(key)
    if text is None:
        return default
    if not text.isdigit() or not 0 < int(text) <= 10_000:
        raise RequestRefused(400, "PAGINATION_NUMBER_INVALID", f"{key}={text[:20]!r} must be "
                             "a number from 1 to 10000")
    return int(text)


def _content_length(request: Request) -> int | None:
    text = request.headers.get("content-length")
    if text is None:
        return None
    if not text.isdigit():
        raise RequestRefused(400, "SIZE_INVALID", f"Content-Length {text[:20]!r} is not a number")
    return int(text)


def _declared_length(request: Request, offset: int, name: str, upload: str) -> int | None:
    """The chunk length a PATCH declares; a Content-Range must start at the session's offset."""
    length = _content_length(request)
    text = request.headers.get("content-range")
    if text is None:
        return length
    match = _CONTENT_RANGE.match(text.strip())
    if not match or int(match.group(2)) < int(match.group(1)):
        raise RequestRefused(400, "SIZE_INVALID", f"Content-Range {text[:40]!r} is not "
                             "'START-END'")
    start, end = int(match.group(1)), int(match.group(2))
    if start != offset:
        raise RequestRefused(416, "BLOB_UPLOAD_INVALID", f"the chunk starts at {start} but the "
                             f"upload has {offset} bytes; resume from {offset}")
    if length is not None and length != end - start + 1:
        raise RequestRefused(400, "SIZE_INVALID", f"Content-Range {start}-{end} declares "
                             f"{end - start + 1} bytes but Content-Length says {length}")
    return end - start + 1


async def _read_bounded(request: Request, limit: int, what: str) -> bytes:
    declared = _content_length(request)
    if declared is not None and declared > limit:
        raise RequestRefused(413, "SIZE_INVALID", f"the {what} is {declared} bytes, over the "
                             f"limit of {limit}")
    parts: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestRefused(413, "SIZE_INVALID", f"the {what} is over the limit of "
                                 f"{limit} bytes")
        parts.append(chunk)
    return b"".join(parts)
