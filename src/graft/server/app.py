"""The ASGI application of `graft serve`: the OCI API, the JSON API and the pages, one app.

Every response carries a Content-Security-Policy that allows no inline script and nothing
from another origin, and the access log records method, path (never the query string) and
status only, never a header: a token cannot reach the log.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from graft.server.config import ServeConfig

__all__ = ["CSP", "create_app"]

#: The policy on every response: scripts, styles and images from this origin only, no inline
#: script or style, no plugins, no framing, forms post back here only.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
_log = logging.getLogger("graft.server.access")
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]


class _Headers:
    """ASGI middleware: security headers on every response, and a token-free access log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [0]

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = list(message.get("headers", []))
                # A route may set its own policy (the try pages add WebAssembly); every other
                # response gets the strict one.
                own = any(k.lower() == b"content-security-policy" for k, _ in headers)
                message["headers"] = [*headers, *(h for h in _HEADERS
                                                  if not (own and h is _HEADERS[0]))]
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            # scope["path"] has no query string; headers (Authorization) are never logged.
            _log.info('%s "%s %s" %d %.1fms', (scope.get("client") or ("-",))[0],
                      scope["method"], scope["path"][:300], status[0],
                      (time.perf_counter() - started) * 1000)


def _lifespan(index: Any) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The upstream index refreshes in the background; a local registry has nothing to do.
        task = await index.start() if hasattr(index, "start") else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()

    return lifespan


def create_app(config: ServeConfig) -> Starlette:
    """Build the application for one server root (or one upstream registry)."""
    from graft.server import api, pages

    if config.upstream:
        from graft.server.upstream import UpstreamIndex

        index: Any = UpstreamIndex(config)
        routes: list[Any] = [Route("/v2/{path:path}", index.refuse_v2, methods=_METHODS)]
    else:
        from graft.server.oci import OciApi
        from graft.server.registry import Registry

        index = Registry(config)
        oci = OciApi(index)
        routes = [Route("/v2", oci.__call__, methods=_METHODS),
                  Route("/v2/{path:path}", oci.__call__, methods=_METHODS)]
    routes += api.routes(index)
    routes.append(Mount("/static", StaticFiles(packages=[("graft.server", "static")]),
                        name="static"))
    routes += pages.routes(index, config)
    app = Starlette(routes=routes, lifespan=_lifespan(index))
    app.state.index = index
    return _Headers(app)  # type: ignore[return-value]
