"""The "Try it" pages of `graft serve`: a module's signature run in the visitor's browser.

A try page is the very site ``graft export web`` writes, served in place: the page's bundle
comes from ``web/dist`` (built once by ``make install``; ONNX Runtime Web's wasm files
included, nothing from a CDN), and the ONNX models and ``site.json`` come from
``graft.export.web.write_site_models``, the code path ``graft export web`` uses.

The models are made on the first request for a module version and signature: the module is
laid out from the server's own blobs into a scratch directory (the layout a push was checked
in), loaded with ``graft.load`` (which checks it again), exported with its parity check, and
moved into ``ROOT/try/<module digest>/<signature>/`` in one rename. A module is immutable, so
the result is kept for good, keyed by digest. An export that fails for a reason inherent to
the module (the page cannot feed its preprocessing, ONNX cannot express it, parity fails) is
kept too, as ``<signature>.failed.json``: the page then says why, and the module page stops
offering the link. Failures of the server itself (a missing extra, an unbuilt bundle, a full
disk) are shown but not kept, so fixing them is enough.

The page needs WebAssembly, so these responses alone carry a policy whose ``script-src``
adds ``'wasm-unsafe-eval'`` (and ``connect-src 'self'`` for the models, ``blob:`` images for
the preview); still no inline script and nothing from another origin.

Torch is imported only when a model is made, never by ``graft serve`` itself.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from graft import _fs
from graft.errors import ExportError, FormatError, GraftError, SignatureError
from graft.server import search

__all__ = ["TRY_CSP", "TryPages"]

#: The policy on try pages: the strict one, plus WebAssembly compilation, fetches of the
#: models from this origin, and ``blob:`` URLs for the preview of a picked image.
TRY_CSP = ("default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; "
           "img-src 'self' data: blob:; connect-src 'self'; worker-src 'self' blob:; "
           "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
#: Cross-origin isolation on every try-page response: it lets the page share memory with
#: workers (``SharedArrayBuffer``), so ONNX Runtime Web runs on several threads. The page and
#: everything it loads come from this origin, so nothing it needs is blocked by it.
ISOLATION = {"cross-origin-opener-policy": "same-origin",
             "cross-origin-embedder-policy": "require-corp",
             "cross-origin-resource-policy": "same-origin"}
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".wasm": "application/wasm", ".json": "application/json",
          ".onnx": "application/octet-stream"}
_PAGE_KINDS = ("image", "text")  # what the page feeds; the rest of the check is the export's
# Failures that say something about the module itself, so they are kept with its digest.
_INHERENT = (ExportError, SignatureError, FormatError)
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


class TryPages:
    """Make, keep and serve the try pages of one registry root.

    Args:
        registry: The :class:`~graft.server.registry.Registry` whose blobs hold the modules.
        render: Renders a server template (``render(name, status, **context)``).
    """

    def __init__(self, registry: Any, render: Any) -> None:
        self.registry = registry
        self.render = render
        self.root = registry.config.root / "try"
        # One export at a time: each uses every core, and the first request of a page and its
        # models' requests must not export the same module twice.
        self._lock = threading.Lock()
        # Builds a crash interrupted: never renamed into place, so nothing reads them.
        for stale in self.root.glob("*/.build-*"):
            shutil.rmtree(stale, ignore_errors=True)

    # -- what is known of a module ------------------------------------------------------------

    def _folder(self, digest: str) -> Path:
        match = _DIGEST.fullmatch(digest)
        if match is None:  # the index only holds digests it computed; refuse anything else
            raise FormatError(f"module digest {digest[:80]!r} is not sha256:<64 hex>")
        return self.root / match.group(1)

    def failure(self, digest: str, signature: str) -> str | None:
        """The kept reason why a signature of a module cannot be tried, if any."""
        path = self._folder(digest) / f"{signature}.failed.json"
        try:
            return str(json.loads(path.read_text(encoding="utf-8"))["message"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def links(self, repo: str, manifest: Any, digest: str) -> dict[str, str]:
        """``signature -> try page URL`` for the signatures worth offering on a module page.

        Offered: a signature with image or text preprocessing (what the page can feed) whose
        export has not failed before.
        """
        out = {}
        for name, spec in manifest.signatures.items():
            pre = spec.preprocess
            if pre is None or pre.kind not in _PAGE_KINDS or self.failure(digest, name):
                continue
            out[name] = _page_url(repo, manifest.version, name)
        return out

    # -- making the models ------------------------------------------------------------------

    def ensure(self, row: Any, signature: str) -> Path:
        """The folder with ``site.json`` and ``models/`` for one module and signature.

        Raises:
            GraftError: the models cannot be made; the message says why.
        """
        base = self._folder(row["module_digest"])
        folder = base / signature
        if (folder / "site.json").is_file():
            return folder
        with self._lock:
            if (folder / "site.json").is_file():
                return folder
            kept = self.failure(row["module_digest"], signature)
            if kept is not None:
                raise ExportError(kept)
            base.mkdir(parents=True, exist_ok=True)
            scratch = base / f".build-{signature}-{uuid.uuid4().hex[:8]}"
            try:
                self._build(row, signature, scratch)
                _fs.replace_dir(scratch / "site", folder)
            except _INHERENT as exc:
                _fs.atomic_write(base / f"{signature}.failed.json",
                                 json.dumps({"message": str(exc)[:4000]}) + "\n")
                raise
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return folder

    def _build(self, row: Any, signature: str, scratch: Path) -> None:
        import graft
        from graft.export.web import plan_site, write_site_models
        from graft.hub.oci import artifact
        from graft.server.modules import assemble

        blobs = self.registry.blobs
        plan = artifact.parse_manifest(blobs.path(row["manifest"]).read_bytes(),
                                       "the stored manifest")
        directory = scratch / "module"
        assemble(plan, blobs.path, directory)
        # graft.load checks every byte and program again before anything is built.
        module = graft.load(directory, trainable=False)
        site = plan_site(module, signature=signature)
        (scratch / "site").mkdir()
        write_site_models(module, site, scratch / "site")

    # -- routes -----------------------------------------------------------------------------

    def routes(self, reader: Any) -> list[Route]:
        """``/NS/NAME/-/try?version=V&signature=S`` (a redirect) and the page's files."""

        async def start(request: Request) -> Response:
            repo = f"{request.path_params['namespace']}/{request.path_params['name']}"
            detail = await self._detail(request, repo, request.query_params.get("version"),
                                        reader)
            if detail is None:
                return self._not_found(repo)
            m = detail["manifest"]
            signature = request.query_params.get("signature") or m.default_signature
            if signature not in m.signatures:
                return self.render("error.html", 404, message=f"{repo} v{m.version} has no "
                                   f"signature {signature[:80]!r}; it has "
                                   f"{', '.join(sorted(m.signatures))}", query="")
            return RedirectResponse(_page_url(repo, m.version, signature), status_code=303)

        async def files(request: Request) -> Response:
            p = request.path_params
            repo = f"{p['namespace']}/{p['name']}"
            detail = await self._detail(request, repo, p["version"], reader)
            if detail is None or p["signature"] not in detail["manifest"].signatures:
                return self._not_found(repo)
            return await self._file(detail, p["signature"], p["file"])

        return [Route("/{namespace}/{name:path}/-/try", start),
                Route("/{namespace}/{name:path}/-/try/{version}/{signature}/{file:path}",
                      files)]

    async def _detail(self, request: Request, repo: str, version: str | None,
                      reader: Any) -> dict[str, Any] | None:
        from graft.server.names import check_repository

        try:
            check_repository(repo)
        except GraftError:
            return None
        return await run_in_threadpool(search.module_detail, self.registry.db, repo, version,
                                       reader(request))

    def _not_found(self, repo: str) -> Response:
        return self.render("error.html", 404, message=f"no module {repo[:120]!r} to try",
                           query="")

    async def _file(self, detail: dict[str, Any], signature: str, name: str) -> Response:
        from graft.export.web import built_bundle

        m, row = detail["manifest"], detail["row"]
        try:
            dist = built_bundle()
            if name in ("", "index.html"):
                await run_in_threadpool(self.ensure, row, signature)
                return _send(dist / "index.html")
            if name == "site.json" or name.startswith("models/"):
                folder = await run_in_threadpool(self.ensure, row, signature)
                return _send_listed(folder, name)
            return _send_listed(dist, name)
        except GraftError as exc:
            # The message page needs no WebAssembly: it keeps the strict policy.
            return self.render("try_failed.html", 422, repo=detail["repo"], m=m,
                               signature=signature, message=str(exc), query="")


def _page_url(repo: str, version: str, signature: str) -> str:
    return f"/{repo}/-/try/{quote(version, safe='')}/{quote(signature, safe='')}/"


def _send_listed(folder: Path, name: str) -> Response:
    """A file of ``folder`` named by the request, only if the folder really lists it."""
    parts = name.split("/")
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts) or len(parts) > 3:
        return _missing(name)
    here = folder
    for part in parts:  # walk the real listing: the request's name never becomes a path
        entries = {p.name: p for p in here.iterdir()} if here.is_dir() else {}
        if part not in entries:
            return _missing(name)
        here = entries[part]
    if not here.is_file() or here.suffix not in _TYPES:
        return _missing(name)
    return _send(here)


def _send(path: Path) -> Response:
    return FileResponse(path, media_type=_TYPES[path.suffix],
                        headers={"content-security-policy": TRY_CSP, **ISOLATION})


def _missing(name: str) -> Response:
    return PlainTextResponse(f"no file {name[:80]!r} here", status_code=404,
                             headers={"content-security-policy": TRY_CSP, **ISOLATION})
