"""A small OCI registry on loopback that serves what a test tells it to, honest or not.

It answers the read side of the distribution API (``/v2/``, manifests, blobs with Range, a
token endpoint), logs every request with its headers, and can be told to lie: other bytes
for a blob, endless or truncated bodies, fixed statuses for a path, redirects to another
server, a bearer-token challenge.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from graft.format.manifest import Manifest
from graft.hub.oci.artifact import MANIFEST_TYPE, build_manifest


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Behaviour:
    """What the server does; tests change it between requests."""

    manifests: dict[str, bytes] = field(default_factory=dict)  # "repo:ref" -> bytes
    blobs: dict[str, bytes] = field(default_factory=dict)  # digest -> bytes
    endless: set[str] = field(default_factory=set)  # digests served as an endless stream
    truncated: dict[str, int] = field(default_factory=dict)  # digest -> bytes actually sent
    statuses: list[tuple[str, int, dict[str, str]]] = field(default_factory=list)
    redirect_blobs: str | None = None  # base URL to 307 blob GETs to
    token: str | None = None  # require "Authorization: Bearer <token>"
    token_user: tuple[str, str] | None = None  # basic creds the token endpoint wants
    drop_after: dict[str, int] = field(default_factory=dict)  # digest -> close after n bytes once


class Hostile:
    """The server; ``url`` is ``http://127.0.0.1:PORT``, or ``https://`` with ``tls``.

    Args:
        tls: ``(certificate, key)`` PEM files: serve HTTPS with them.
    """

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        self.behaviour = Behaviour()
        self.log: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        handler = _handler(self)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.url = f"http://{self.address}"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.url = f"https://{self.address}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def serve_module(self, directory: Path, repository: str, tag: str = "1.0.0") -> dict[str, Any]:
        """Publish a module directory honestly; return its manifest bytes, digest and plan."""
        module = Manifest.read(directory)
        data, plan, sources = build_manifest(module, directory)
        self.behaviour.blobs[plan.config.digest] = module.canonical()
        for digest, (path, start, end) in sources.items():
            self.behaviour.blobs[digest] = path.read_bytes()[start:end]
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.put_manifest(repository, tag, data)
        return {"manifest": data, "digest": digest, "plan": plan, "module": module}

    def put_manifest(self, repository: str, tag: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.behaviour.manifests[f"{repository}:{tag}"] = data
        self.behaviour.manifests[f"{repository}:{digest}"] = data
        return digest

    def put_blob(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.behaviour.blobs[digest] = data
        return digest

    def requests(self, method: str | None = None, contains: str = "") -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.log if (method is None or r["method"] == method)
                    and contains in r["path"]]


_MANIFEST = re.compile(r"^/v2/(.+)/manifests/([^/]+)$")
_BLOB = re.compile(r"^/v2/(.+)/blobs/(sha256:[0-9a-f]{64})$")


def _handler(owner: Hostile) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  head: bool = False) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str, headers: dict[str, str] | None = None) -> None:
            body = json.dumps({"errors": [{"code": code, "message": code.lower()}]}).encode()
            self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

        def _serve(self, head: bool) -> None:
            b = owner.behaviour
            path = self.path.split("?", 1)[0]
            with owner._lock:
                owner.log.append({"method": self.command, "path": self.path,
                                  "headers": {k.lower(): v for k, v in self.headers.items()}})
            for pattern, status, headers in list(b.statuses):
                if re.search(pattern, path):
                    if status in (401,) and "www-authenticate" not in {k.lower() for k in headers}:
                        headers = {**headers, "WWW-Authenticate": 'Basic realm="hostile"'}
                    self._error(status, {401: "UNAUTHORIZED", 403: "DENIED", 404: "NOT_FOUND",
                                         429: "TOOMANYREQUESTS"}.get(status, "UNKNOWN"), headers)
                    return
            if path == "/token":
                auth = self.headers.get("Authorization", "")
                if b.token_user is not None:
                    import base64

                    want = "Basic " + base64.b64encode(":".join(b.token_user).encode()).decode()
                    if auth != want:
                        self._error(401, "UNAUTHORIZED")
                        return
                self._send(200, json.dumps({"token": b.token}).encode(),
                           {"Content-Type": "application/json"})
                return
            if b.token is not None and self.headers.get("Authorization") != f"Bearer {b.token}":
                self._error(401, "UNAUTHORIZED", {"WWW-Authenticate":
                            f'Bearer realm="{owner.url}/token",service="hostile",'
                            'scope="repository:x:pull"'})
                return
            if path == "/v2/":
                self._send(200, b"{}", {"Content-Type": "application/json"}, head)
                return
            match = _MANIFEST.match(path)
            if match:
                data = b.manifests.get(f"{match.group(1)}:{match.group(2)}")
                if data is None:
                    self._error(404, "MANIFEST_UNKNOWN")
                    return
                self._send(200, data, {"Content-Type": MANIFEST_TYPE}, head)
                return
            match = _BLOB.match(path)
            if match:
                self._blob(match.group(2), head)
                return
            self._error(404, "NAME_UNKNOWN")

        def _blob(self, digest: str, head: bool) -> None:
            b = owner.behaviour
            if b.redirect_blobs and not head:
                self._send(307, b"", {"Location": f"{b.redirect_blobs}{self.path}"})
                return
            if digest in b.endless:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()  # no length: read until the client gives up
                try:
                    for _ in range(100_000):  # bounded, but far past any declared size
                        self.wfile.write(b"\0" * 65536)
                except OSError:
                    pass
                self.close_connection = True
                return
            data = b.blobs.get(digest)
            if data is None:
                self._error(404, "BLOB_UNKNOWN")
                return
            if digest in b.truncated:
                data = data[:b.truncated[digest]]
                self._send(200, data, {"Content-Type": "application/octet-stream"}, head)
                return
            start = 0
            status = 200
            headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
            rng = re.match(r"^bytes=(\d+)-$", self.headers.get("Range", ""))
            if rng and not head:
                start = int(rng.group(1))
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            cut = b.drop_after.pop(digest, None)
            if cut is not None and not head:
                # promise the whole body, send part of it, and hang up
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self._send(status, body, headers, head)

    return Handler
