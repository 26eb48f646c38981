"""The web pages: home with search, search results, a namespace, a module, its try pages.

Server-rendered with Jinja2 (autoescape on for every template), no build step and no inline
script: the one script, ``static/copy.js``, only copies the load line to the clipboard.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from graft.errors import RequestRefused
from graft.hub.oci.reference import tag_for_version
from graft.server import search
from graft.server.api import reader_of
from graft.server.cards import render_card
from graft.server.config import ServeConfig
from graft.server.lineage import lineage_svg
from graft.server.names import check_namespace, check_repository

__all__ = ["human", "routes"]

_TEMPLATES = Path(__file__).with_name("templates")
_env = Environment(loader=FileSystemLoader(_TEMPLATES), autoescape=select_autoescape(default=True),
                   trim_blocks=True, lstrip_blocks=True)
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
             "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


def human(size: float) -> str:
    """``1536`` -> ``"1.5 KB"``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


_env.filters["human"] = human


def _render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(_env.get_template(name).render(**context), status_code=status)


def routes(index: Any, config: ServeConfig) -> list[Route]:
    """The page routes over a registry or an upstream index."""

    # Try pages need the module's bytes: a registry root has them, an upstream index not.
    trials = None
    if hasattr(index, "blobs"):
        from graft.server.trypage import TryPages

        trials = TryPages(index, _render)

    def host_of(request: Request) -> str:
        if config.public_host:
            return config.public_host
        if getattr(index, "registry_host", None):
            return index.registry_host
        return request.headers.get("host", "localhost")[:255]

    async def home(request: Request) -> Response:
        recent = await run_in_threadpool(search.latest, index.db, _reader(request))
        return _render("home.html", modules=recent[:30], query="")

    async def results(request: Request) -> Response:
        query = request.query_params.get("q", "")[: search.MAX_QUERY]
        found = await run_in_threadpool(search.search, index.db, query, _reader(request))
        return _render("search.html", modules=found, query=query)

    async def namespace(request: Request) -> Response:
        name = request.path_params["namespace"]
        try:
            check_namespace(name)
        except RequestRefused:
            return _not_found(f"no namespace {name[:80]!r}")
        found = await run_in_threadpool(search.namespace_modules, index.db, name,
                                        _reader(request))
        if not found:
            return _not_found(f"namespace {name} has no modules you can see")
        return _render("namespace.html", namespace=name, modules=found, query="")

    async def module(request: Request) -> Response:
        repo = f"{request.path_params['namespace']}/{request.path_params['name']}"
        try:
            check_repository(repo)
        except RequestRefused:
            return _not_found(f"no module {repo[:120]!r}")
        version = request.query_params.get("version")
        detail = await run_in_threadpool(search.module_detail, index.db, repo, version,
                                         _reader(request))
        if detail is None:
            return _not_found(f"no module {repo}" + (f" version {version}" if version else ""))
        context = _module_context(detail, host_of(request))
        context["try_links"] = ({} if trials is None else await run_in_threadpool(
            trials.links, repo, detail["manifest"], detail["row"]["module_digest"]))
        return _render("module.html", **context, query="")

    def _reader(request: Request) -> str | None:
        try:
            return reader_of(index, request)
        except RequestRefused:
            return None

    tries = [] if trials is None else trials.routes(_reader)
    return [Route("/", home), Route("/search", results),
            Route("/{namespace}", namespace), *tries,
            Route("/{namespace}/{name:path}", module)]


def _not_found(message: str) -> HTMLResponse:
    return _render("error.html", status=404, message=message, query="")


def _module_context(detail: dict[str, Any], host: str) -> dict[str, Any]:
    m = detail["manifest"]
    row = detail["row"]
    repo = detail["repo"]
    tag = tag_for_version(m.version)
    tensors = []
    for name, t in sorted(m.tensors.items()):
        numel = math.prod(t.shape) if t.shape else 1
        tensors.append({"name": name, "kind": t.kind, "dtype": t.dtype,
                        "shape": "×".join(map(str, t.shape)) or "scalar",
                        "size": numel * _ITEMSIZE.get(t.dtype, 1), "sha256": t.sha256})
    parents = [{"title": p["repo"] or p["handle"],
                "subtitle": f"v{p['version']}" if p["version"] else p["digest"][:19],
                "href": f"/{p['repo']}?version={p['version']}" if p["repo"] else None}
               for p in detail["parents"]]
    children = [{"title": c["repo"], "subtitle": f"v{c['version']}",
                 "href": f"/{c['repo']}?version={c['version']}"} for c in detail["children"]]
    return {
        "repo": repo,
        "namespace": repo.split("/", 1)[0],
        "m": m,
        "row": row,
        "yanked": bool(row["yanked"]),
        "card": render_card(row["card"]),
        "copy_line": f'graft.load("oci://{host}/{repo}:{tag}")',
        "pull_line": f"graft pull oci://{host}/{repo}@{row['manifest']}",
        "versions": detail["versions"],
        "parents": detail["parents"],
        "children": detail["children"],
        "lineage": lineage_svg({"title": repo, "subtitle": f"v{m.version}"}, parents, children),
        "files": sorted(m.files.items()),
        "tensors": tensors,
        "params": sum(math.prod(t.shape) if t.shape else 1 for t in m.tensors.values()
                      if t.kind == "parameter"),
    }
