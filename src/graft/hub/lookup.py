"""Finding a stored module by handle: latest-version order, and messages that say what exists."""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable

from graft.errors import HandleError, ModuleNotFound
from graft.hub.handles import Handle, parse_handle

__all__ = ["HOW_TO_ADD", "find", "hex_of", "store_handle", "version_key"]

HOW_TO_ADD = ("add one with `graft add DIR` (a module directory) or `graft import NAME` "
              "(a pretrained importer)")


def hex_of(digest: str) -> str:
    """The hex part of a ``sha256:<hex>`` digest."""
    algorithm, _, hexdigest = str(digest).partition(":")
    if algorithm != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
        raise HandleError(f"digest {digest!r} is malformed; expected 'sha256:<64 hex>'")
    return hexdigest


def store_handle(handle: str | Handle, action: str) -> Handle:
    """Parse a handle that must name a module in the local store."""
    parsed = parse_handle(handle)
    if parsed.kind != "store":
        raise HandleError(f"{action}: {str(handle)!r} is a {parsed.kind} handle; the local store "
                          "takes 'name', 'name@version' or 'name@sha256:<hex>' (open a module "
                          "directory with graft.load(path), add one with Store.add(path))")
    return parsed


def version_key(version: str) -> tuple[Any, ...]:
    """Order versions by release numbers (1.10.0 > 1.9.0); a -prerelease comes before its
    release; +build metadata does not count."""
    match = re.match(r"(\d+(?:\.\d+)*)(-[0-9A-Za-z.-]+)?", version)
    if match is None:
        return ((), (0, ()))
    release = tuple(int(p) for p in match.group(1).split("."))
    release += (0,) * max(0, 3 - len(release))
    if match.group(2):
        parts = match.group(2)[1:].split(".")
        pre = (0, tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts))
    else:
        pre = (1, ())
    return (release, pre)


def find(store: Any, handle: Handle, query: Callable[..., list[Any]], *,
         exact: bool = False) -> Any:
    """The indexed module a store handle names.

    Args:
        store: The store (for its root, in messages, and to turn rows into entries).
        query: Runs SQL on the index and returns rows.
        exact: Refuse a bare name that matches several versions (for destructive calls).

    Raises:
        ModuleNotFound: nothing matches; the message lists what is stored.
        HandleError: ``exact`` and a bare name matches several versions.
    """
    found = [store._stored(r) for r in query("SELECT * FROM modules WHERE name = ?",
                                             (handle.name,))]
    found.sort(key=lambda m: (version_key(m.version), m.created))
    versions = ", ".join(m.version for m in found)
    if not found:
        names = [r["name"] for r in query("SELECT DISTINCT name FROM modules")]
        close = difflib.get_close_matches(str(handle.name), names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModuleNotFound(f"no module named {handle.name!r} in the local store at "
                             f"{store.root}{hint}; {HOW_TO_ADD}")
    if handle.digest is not None:
        for module in found:
            if module.digest == handle.digest:
                return module
        other = query("SELECT name, version FROM modules WHERE digest = ?", (handle.digest,))
        if other:
            raise ModuleNotFound(f"{handle.digest} is {other[0]['name']}@{other[0]['version']}, "
                                 f"not a version of {handle.name!r}; use "
                                 f"{other[0]['name']}@{handle.digest}")
        raise ModuleNotFound(f"no {handle.name!r} module with digest {handle.digest} in the "
                             f"local store at {store.root}; it holds versions {versions}. "
                             f"Use one of those, or {HOW_TO_ADD}")
    if handle.version is not None:
        for module in found:
            if module.version == handle.version:
                return module
        raise ModuleNotFound(f"{handle.name}@{handle.version} is not in the local store at "
                             f"{store.root}; it holds {handle.name} versions {versions}. "
                             f"Use one of those, or {HOW_TO_ADD}")
    if exact and len(found) > 1:
        raise HandleError(f"handle {handle.name!r} matches {len(found)} stored versions "
                          f"({versions}); name the one you mean, e.g. "
                          f"'{handle.name}@{found[-1].version}'")
    return found[-1]
