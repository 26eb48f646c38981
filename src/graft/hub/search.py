"""``graft search``: ask a registry run by ``graft serve`` for modules (its /api/v1/search).

Plain HTTP for loopback hosts and ``$GRAFT_INSECURE_REGISTRIES``, HTTPS otherwise, as for
pushes and pulls. ``$GRAFT_TOKEN``, when set, goes only to that host (redirects are not
followed), so a private namespace's modules show to its token holder.
"""

from __future__ import annotations

from typing import Any

from graft._extras import require
from graft._terminal import printable
from graft.errors import GraftError, RegistryError
from graft.format import jsonio
from graft.settings import default_registry, insecure_registries, offline, registry_token

__all__ = ["print_search", "search"]

_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
_MAX_RESPONSE = 8 << 20


def _base(registry: str) -> str:
    host = registry.split("]")[0] + "]" if registry.startswith("[") \
        else registry.rsplit(":", 1)[0]
    plain = host in _LOOPBACK or registry in insecure_registries() or host in insecure_registries()
    return f"{'http' if plain else 'https'}://{registry}"


def search(query: str, *, registry: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """The modules a registry finds for ``query`` (latest versions, as JSON objects).

    Raises:
        GraftError: no registry is given, GRAFT_OFFLINE=1, or the registry refuses.
    """
    registry = (registry or default_registry() or "").removeprefix("oci://").rstrip("/")
    if not registry:
        raise GraftError("no registry to search: pass --registry HOST[:PORT] or set "
                         "GRAFT_REGISTRY")
    if offline():
        raise GraftError("GRAFT_OFFLINE=1 forbids searching a registry; unset it to search")
    if not 1 <= limit <= 500:
        raise GraftError(f"--limit {limit} must be 1 to 500")
    httpx = require("httpx", "serve", "`graft search`")
    headers = {"User-Agent": "graft-hub", "Accept": "application/json"}
    token = registry_token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = f"{_base(registry)}/api/v1/search"
    try:
        with httpx.Client(timeout=30.0, follow_redirects=False, trust_env=False) as client:
            response = client.get(url, params={"q": query, "limit": str(limit)},
                                  headers=headers)
    except httpx.HTTPError as exc:
        raise RegistryError(f"cannot reach {registry} to search: {exc}") from None
    body = response.content[:_MAX_RESPONSE]
    if response.status_code != 200:
        try:
            message = jsonio.loads(body, what="the error").get("error", "")
        except (GraftError, AttributeError):
            message = ""
        raise RegistryError(f"{registry} refused the search (HTTP {response.status_code})"
                            + (f": {message}" if message else "; is it a `graft serve`?"))
    data = jsonio.loads(body, what="the search response")
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        raise RegistryError(f"{registry} answered the search with something that is not a "
                            "result list; is it a `graft serve`?")
    return results


def print_search(query: str, *, registry: str | None = None, limit: int = 20) -> None:
    """Print one block per module found: the load line, the description, the signatures."""
    registry = (registry or default_registry() or "").removeprefix("oci://").rstrip("/")
    results = search(query, registry=registry, limit=limit)
    if not results:
        print(f"no modules match {query!r} on {registry}")
        return
    for item in results:
        repo, version = _text(item.get("repository")), _text(item.get("version"))
        print(f"oci://{registry}/{repo}:{version.replace('+', '_')}")
        if item.get("description"):
            print(f"  {_text(item['description'])}")
        for sig in item.get("signatures") or []:
            print(f"  {_text(sig.get('name'))}({_text(sig.get('inputs'))}) -> "
                  f"{_text(sig.get('outputs'))}")
        for parent in item.get("parents") or []:
            print(f"  parent {_text(parent.get('handle'))}")


def _text(value: Any) -> str:
    """A registry's string made safe for a terminal (and bounded)."""
    return printable(value)[:500]
