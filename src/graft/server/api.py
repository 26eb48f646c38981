"""The JSON API beside the OCI one: search, module details, yanks.

::

    GET  /api/v1/search?q=QUERY&limit=N          latest versions matching QUERY
    GET  /api/v1/modules/NAMESPACE/NAME          versions, signatures, parents, children
    POST /api/v1/modules/NAMESPACE/NAME/yank?version=V     needs a push token
    POST /api/v1/modules/NAMESPACE/NAME/unyank?version=V   needs a push token
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from graft.errors import RequestRefused
from graft.server import auth, search
from graft.server.names import check_repository

__all__ = ["reader_of", "routes"]


def reader_of(index: Any, request: Request) -> str | None:
    """The namespace whose private modules the request's token may read, if any."""
    token = auth.Credentials.token(request.headers.get("authorization"))
    grant = auth.parse_token(index.db, token) if token else None
    return grant.namespace if grant else None


def _error(exc: RequestRefused) -> Response:
    return JSONResponse({"error": str(exc), "code": exc.code}, status_code=exc.status)


def routes(index: Any) -> list[Route]:
    """The ``/api/v1`` routes over a :class:`~graft.server.registry.Registry` or an upstream
    index (both hold the module index in ``index.db``)."""

    async def do_search(request: Request) -> Response:
        try:
            reader = reader_of(index, request)
            text = request.query_params.get("limit", "50")
            if not text.isdigit() or not 0 < int(text) <= 500:
                raise RequestRefused(400, "INVALID", f"limit={text[:20]!r} must be 1 to 500")
            query = request.query_params.get("q", "")
            found = await run_in_threadpool(search.search, index.db, query, reader, int(text))
        except RequestRefused as exc:
            return _error(exc)
        return JSONResponse({"query": query, "results": [m.to_json() for m in found]})

    async def module(request: Request) -> Response:
        rest = request.path_params["rest"]
        try:
            action = None
            for suffix in ("/yank", "/unyank"):
                if rest.endswith(suffix):
                    rest, action = rest[: -len(suffix)], suffix[1:]
            repo = check_repository(rest)
            if action is not None:
                return await _yank(request, repo, action == "yank")
            if request.method != "GET":
                raise RequestRefused(405, "UNSUPPORTED", "use GET")
            detail = await run_in_threadpool(search.module_detail, index.db, repo, None,
                                             reader_of(index, request))
            if detail is None:
                raise RequestRefused(404, "NAME_UNKNOWN", f"no module {repo}")
        except RequestRefused as exc:
            return _error(exc)
        m = detail["manifest"]
        return JSONResponse({
            "repository": repo, "name": m.name, "version": m.version,
            "description": m.description, "license": m.license, "digest": m.digest,
            "signatures": {k: s.to_json() for k, s in m.signatures.items()},
            "versions": detail["versions"], "parents": detail["parents"],
            "children": detail["children"],
        })

    async def _yank(request: Request, repo: str, yanked: bool) -> Response:
        if request.method != "POST":
            raise RequestRefused(405, "UNSUPPORTED", "yank with POST")
        if not hasattr(index, "yank"):
            raise RequestRefused(405, "UNSUPPORTED", "this server shows an upstream registry; "
                                 "versions are managed there")
        auth.authorize(index.db, request.headers.get("authorization"), repo, "push")
        version = request.query_params.get("version", "")
        digest = await run_in_threadpool(index.yank, repo, version, yanked)
        return JSONResponse({"repository": repo, "version": version, "manifest": digest,
                             "yanked": yanked})

    return [Route("/api/v1/search", do_search),
            Route("/api/v1/modules/{rest:path}", module, methods=["GET", "POST"])]
