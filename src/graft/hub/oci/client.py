"""The HTTP side of the OCI distribution protocol, on httpx.

httpx because it gives one synchronous client that is safe to share between the download
threads, pools keep-alive connections (hundreds of small tensor blobs per module), streams
bodies (a blob is never held in memory whole), and lets redirects be followed by hand, which
is what keeps credentials from leaving the registry's host.

What this client does on every request:

- authentication: the registry's ``WWW-Authenticate`` challenge decides. ``Bearer`` runs the
  Docker/OCI token flow (``GET realm?service=&scope=`` with basic credentials when there are
  some; ``$GRAFT_TOKEN`` is used as the bearer token as is); ``Basic`` sends the username and
  password. Tokens are cached per scope.
- redirects are followed by hand, at most 5; the ``Authorization`` header goes only to the
  registry's own scheme, host and port, never to the host a redirect points at.
- 429 and 5xx (and dropped connections) are retried a bounded number of times with
  exponential backoff, honouring ``Retry-After``; every other failure is one clear error.
"""

from __future__ import annotations

import email.utils
import re
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlencode, urljoin, urlsplit

from graft._extras import require
from graft.errors import ModuleNotFound, RegistryAuthError, RegistryError
from graft.format import jsonio
from graft.hub.oci.credentials import Credentials, credentials_for
from graft.settings import insecure_registries

__all__ = ["RegistryClient", "check_offline"]

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_MAX_REDIRECTS = 5
_MAX_RETRY_AFTER = 60.0
_MAX_TOKEN_RESPONSE = 1 << 20
_MAX_ERROR_BODY = 4096
_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
_PARAM = re.compile(r'(\w+)="([^"]*)"|(\w+)=([^",\s]+)')


def check_offline(what: str) -> None:
    """Refuse any network access under ``GRAFT_OFFLINE=1``."""
    from graft.settings import offline

    if offline():
        raise ModuleNotFound(f"{what} is not in the local store, and GRAFT_OFFLINE=1 forbids "
                             "fetching it; unset GRAFT_OFFLINE (or pull it on a machine that "
                             "can reach the registry) and try again")


class RegistryClient:
    """A client of one registry (``host[:port]``).

    Args:
        registry: ``host`` or ``host:port``.
        credentials: What to answer challenges with; default: ``$GRAFT_TOKEN`` and the
            credentials file.
        scheme: ``"https"`` or ``"http"``; default http for loopback hosts and those in
            ``$GRAFT_INSECURE_REGISTRIES``, https otherwise.
        retries: How many times a 429, a 5xx or a dropped connection is retried.
        backoff: Seconds of the first retry's wait; each later one doubles it.
        timeout: Seconds to connect, and between two reads of a body.
        sleep: Waits between retries (tests pass a recorder).
        transport: An httpx transport (tests); default the network.
    """

    def __init__(self, registry: str, *, credentials: Credentials | None = None,
                 scheme: str | None = None, retries: int = 4, backoff: float = 0.5,
                 timeout: float = 30.0, sleep: Callable[[float], None] = time.sleep,
                 transport: Any = None) -> None:
        httpx = require("httpx", "oci", "talking to an OCI registry")
        self.registry = registry.lower()
        if scheme is None:
            host = self.registry.rsplit(":", 1)[0] if not self.registry.startswith("[") \
                else self.registry.split("]")[0] + "]"
            plain = host in _LOOPBACK or self.registry in insecure_registries() \
                or host in insecure_registries()
            scheme = "http" if plain else "https"
        self.base = f"{scheme}://{self.registry}"
        self._origin = _origin(self.base)
        self._credentials = credentials if credentials is not None else credentials_for(registry)
        self._retries, self._backoff, self._sleep = retries, backoff, sleep
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        mounts = None
        if transport is None:
            # https through a transport made on first use: loading the CA bundle costs about
            # 50 ms, which a pull from a plain-http registry never needs. The plain one is
            # given an unverifying context only because httpx builds one for every transport;
            # it never handshakes (an https URL, a redirect to a CDN too, takes the other).
            transport = _OnFirstUse(lambda: httpx.HTTPTransport(verify=_verified_context(),
                                                                limits=limits))
            mounts = {"http://": httpx.HTTPTransport(verify=False, limits=limits)}
        self._http = httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=False,
                                  transport=transport, mounts=mounts, trust_env=False,
                                  limits=limits,
                                  headers={"User-Agent": "graft-hub",
                                           # digests cover the bytes as stored, not a
                                           # compressed form of them
                                           "Accept-Encoding": "identity"})
        self._httpx = httpx
        self.bytes_sent = 0
        self.bytes_received = 0

    def close(self) -> None:
        self._http.close()

    def count(self, *, sent: int = 0, received: int = 0) -> None:
        """Add to the byte counters (body bytes; the download threads share them)."""
        with self._lock:
            self.bytes_sent += sent
            self.bytes_received += received

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- requests --------------------------------------------------------------------------

    def request(self, method: str, path: str, *, scope: str, ok: tuple[int, ...] = (200,),
                headers: Mapping[str, str] | None = None, content: Any = None,
                params: Mapping[str, str] | None = None, allow: tuple[int, ...] = ()) -> Any:
        """Send a request (body read whole) and return the response.

        ``ok`` statuses return; ``allow`` statuses also return (for callers that interpret
        them, like 404 on a HEAD); every other status raises.
        """
        with self.stream(method, path, scope=scope, ok=ok, headers=headers, content=content,
                         params=params, allow=allow) as response:
            response.read()
            self.count(received=len(response.content))
            return response

    @contextmanager
    def stream(self, method: str, path: str, *, scope: str, ok: tuple[int, ...] = (200,),
               headers: Mapping[str, str] | None = None, content: Any = None,
               params: Mapping[str, str] | None = None,
               allow: tuple[int, ...] = ()) -> Iterator[Any]:
        """Like :meth:`request`, but the body is left to the caller to stream."""
        url = path if "://" in path else self.base + path
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params)
        response = self._send(method, url, scope=scope, headers=dict(headers or {}),
                              content=content)
        try:
            if response.status_code not in ok + allow:
                response.read()
                raise self._failure(method, url, response)
            yield response
        finally:
            response.close()

    def _send(self, method: str, url: str, *, scope: str, headers: dict[str, str],
              content: Any) -> Any:
        """One logical request: auth, bounded retries, hand-followed redirects."""
        httpx = self._httpx
        authenticated = False
        attempt = 0
        redirects = 0
        while True:
            sent = dict(headers)
            if _origin(url) == self._origin:
                auth = self._authorization(scope)
                if auth:
                    sent["Authorization"] = auth
            try:
                request = self._http.build_request(method, url, headers=sent, content=content)
                response = self._http.send(request, stream=True)
            except (httpx.TransportError, OSError) as exc:
                if attempt < self._retries and _replayable(content):
                    self._sleep(self._delay(attempt, None))
                    attempt += 1
                    continue
                raise RegistryError(f"cannot reach the registry {self.registry} ({method} "
                                    f"{_path(url)}): {type(exc).__name__}: {exc}; check the "
                                    "address, that it is running, and your network") from None
            if isinstance(content, bytes):
                self.count(sent=len(content))
            status = response.status_code
            if status in (301, 302, 303, 307, 308) and "location" in response.headers:
                response.close()
                redirects += 1
                if redirects > _MAX_REDIRECTS:
                    raise RegistryError(f"the registry {self.registry} redirected {method} "
                                        f"{_path(url)} more than {_MAX_REDIRECTS} times")
                target = urljoin(url, response.headers["location"])
                if urlsplit(target).scheme not in ("http", "https"):
                    raise RegistryError(f"the registry {self.registry} redirected to a "
                                        "non-HTTP location; refusing to follow it")
                url = target
                if status == 303:
                    method, content = "GET", None
                continue
            if status == 401 and not authenticated and _origin(url) == self._origin:
                challenge = response.headers.get("www-authenticate", "")
                response.close()
                self._answer(challenge, scope)
                authenticated = True
                continue
            if status in _RETRY_STATUS and attempt < self._retries and _replayable(content):
                retry_after = _retry_after(response.headers.get("retry-after"))
                response.close()
                if retry_after is not None and retry_after > _MAX_RETRY_AFTER:
                    raise RegistryError(f"the registry {self.registry} answered {status} and "
                                        f"asks to wait {retry_after:.0f} s before retrying "
                                        f"{method} {_path(url)}; try again later")
                self._sleep(self._delay(attempt, retry_after))
                attempt += 1
                continue
            return response

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return max(0.0, retry_after)
        return self._backoff * (2 ** attempt)

    # -- authentication --------------------------------------------------------------------

    def _authorization(self, scope: str) -> str | None:
        with self._lock:
            return self._tokens.get(scope) or self._tokens.get("*")

    def _answer(self, challenge: str, scope: str) -> None:
        """Turn a 401 challenge into an Authorization header for ``scope``."""
        kind, _, rest = challenge.strip().partition(" ")
        params = {m.group(1) or m.group(3): m.group(2) if m.group(1) else m.group(4)
                  for m in _PARAM.finditer(rest)}
        creds = self._credentials
        if kind.lower() == "basic":
            if creds.basic is None:
                raise RegistryAuthError(f"the registry {self.registry} asks for a username and "
                                        f"password; run `graft login {self.registry}`")
            header = "Basic " + _b64(f"{creds.basic[0]}:{creds.basic[1]}")
            with self._lock:
                self._tokens["*"] = header
            return
        if kind.lower() != "bearer":
            raise RegistryAuthError(f"the registry {self.registry} asks for authentication of "
                                    f"an unsupported kind {kind[:20]!r}; Graft speaks Basic "
                                    "and Bearer")
        if creds.token and creds.basic is None:
            with self._lock:
                self._tokens[scope] = f"Bearer {creds.token}"
            return
        realm = params.get("realm", "")
        if urlsplit(realm).scheme not in ("http", "https"):
            raise RegistryAuthError(f"the registry {self.registry} names no usable token "
                                    "service in its challenge")
        # One scope parameter per repository (a mount asks for two).
        scopes = scope.split() if scope != "*" else params.get("scope", "").split()
        query = [("scope", s) for s in scopes]
        if params.get("service"):
            query.append(("service", params["service"]))
        auth = creds.basic
        try:
            response = self._http.get(realm, params=query, auth=auth)
            body = response.read()[:_MAX_TOKEN_RESPONSE + 1]
        except (self._httpx.TransportError, OSError) as exc:
            raise RegistryError(f"cannot reach the token service of {self.registry} "
                                f"({type(exc).__name__})") from None
        if response.status_code in (401, 403):
            hint = (f"run `graft login {self.registry}` with valid credentials"
                    if auth else f"run `graft login {self.registry}` or set GRAFT_TOKEN")
            raise RegistryAuthError(f"the token service of {self.registry} refused "
                                    f"{'the credentials' if auth else 'anonymous access'} "
                                    f"({response.status_code}); {hint}")
        if response.status_code != 200:
            raise RegistryError(f"the token service of {self.registry} answered "
                                f"{response.status_code}")
        data = jsonio.loads(body, what=f"token response of {self.registry}",
                            max_bytes=_MAX_TOKEN_RESPONSE)
        token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token or not token.isprintable():
            raise RegistryError(f"the token service of {self.registry} sent no usable token")
        with self._lock:
            self._tokens[scope] = f"Bearer {token}"

    # -- errors ----------------------------------------------------------------------------

    def _failure(self, method: str, url: str, response: Any) -> Exception:
        status = response.status_code
        detail = _server_message(response.content[:_MAX_ERROR_BODY])
        where = f"{method} {_path(url)}"
        said = f" (the registry said: {detail})" if detail else ""
        if status == 401:
            return RegistryAuthError(f"the registry {self.registry} refused the credentials for "
                                     f"{where}{said}; run `graft login {self.registry}` or set "
                                     "GRAFT_TOKEN")
        if status == 403:
            return RegistryAuthError(f"the registry {self.registry} denies {where}{said}; ask "
                                     "its administrator for access to this repository")
        if status == 404:
            return ModuleNotFound(f"the registry {self.registry} has nothing at "
                                  f"{_path(url)}{said}; check the repository, tag or digest")
        if status in _RETRY_STATUS:
            return RegistryError(f"the registry {self.registry} answered {status} to {where} "
                                 f"after {self._retries} retries{said}; try again later")
        return RegistryError(f"the registry {self.registry} answered {status} to {where}{said}")


class _OnFirstUse:
    """An httpx transport that is made when its first request comes (thread-safe)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make, self._made, self._lock = make, None, threading.Lock()

    def handle_request(self, request: Any) -> Any:
        with self._lock:
            if self._made is None:
                self._made = self._make()
        return self._made.handle_request(request)

    def close(self) -> None:
        with self._lock:
            if self._made is not None:
                self._made.close()


_CONTEXT_LOCK = threading.Lock()
_CONTEXT: Any = None


def _verified_context() -> Any:
    """One certificate-verifying TLS context per process, shared by every client (httpx's
    default: certifi's bundle), so the bundle is loaded once."""
    global _CONTEXT
    with _CONTEXT_LOCK:
        if _CONTEXT is None:
            import httpx

            _CONTEXT = httpx.create_ssl_context(trust_env=False)
        return _CONTEXT


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, f"{(parts.hostname or '').lower()}:{parts.port or default}"


def _path(url: str) -> str:
    return urlsplit(url).path


def _replayable(content: Any) -> bool:
    return content is None or isinstance(content, bytes)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _server_message(body: bytes) -> str:
    """The first error of an OCI error body, made printable and short; else ''."""
    try:
        data = jsonio.loads(body, what="registry error")
        first = data["errors"][0]
        text = f"{first.get('code', '')}: {first.get('message', '')}"
    except Exception:  # noqa: BLE001 -- any non-conforming body just carries no detail
        return ""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text[:200]
