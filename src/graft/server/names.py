"""Checking the names a request carries: repositories, tags, digests, upload ids.

Every name reaches the file system or the database only after one of these checks, so a
request cannot name a path outside the server's root (``..``, ``/`` tricks, NUL) or make the
server store an unbounded key. Repository names follow the OCI distribution grammar, with two
of Graft's own rules: at least two components (``NAMESPACE/NAME``, so a token can own the
namespace) and a namespace that is not one of the server's own top-level paths.
"""

from __future__ import annotations

import re

from graft.errors import RequestRefused

__all__ = [
    "MAX_NAME_LENGTH",
    "RESERVED_NAMESPACES",
    "check_digest",
    "check_namespace",
    "check_repository",
    "check_tag",
    "check_upload_id",
    "namespace_of",
]

#: Longest repository name accepted (the OCI spec lets registries cap it; 255 is the usual cap).
MAX_NAME_LENGTH = 255
#: Namespaces that would shadow the server's own pages and APIs.
RESERVED_NAMESPACES = frozenset({"v2", "api", "static", "search", "healthz", "token"})

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_UPLOAD = re.compile(r"[0-9a-f]{32}")


def _refuse(code: str, message: str) -> RequestRefused:
    return RequestRefused(400, code, message)


def check_repository(name: str) -> str:
    """Return ``name`` if it is a valid ``NAMESPACE/NAME[/...]`` repository name.

    Raises:
        RequestRefused: 400 ``NAME_INVALID`` saying what is wrong with it.
    """
    if len(name) > MAX_NAME_LENGTH:
        raise _refuse("NAME_INVALID", f"repository name of {len(name)} characters is over the "
                      f"limit of {MAX_NAME_LENGTH}")
    if "\x00" in name or any(ord(c) < 0x20 for c in name):
        raise _refuse("NAME_INVALID", "repository name contains a NUL or control character")
    parts = name.split("/")
    if len(parts) < 2:
        raise _refuse("NAME_INVALID", f"repository name {name!r} has no namespace; use "
                      "NAMESPACE/NAME, e.g. 'vision/tiny-cnn'")
    for part in parts:
        if part in ("", ".", ".."):
            raise _refuse("NAME_INVALID", f"repository name {name!r} has an empty, '.' or '..' "
                          "component")
        if not _COMPONENT.fullmatch(part):
            raise _refuse("NAME_INVALID", f"repository name component {part!r} is invalid; use "
                          "lowercase letters and digits, separated by '.', '_', '__' or '-'")
    check_namespace(parts[0])
    return name


def check_namespace(namespace: str) -> str:
    """Return ``namespace`` if it is one valid, unreserved name component."""
    if len(namespace) > MAX_NAME_LENGTH or not _COMPONENT.fullmatch(namespace):
        raise _refuse("NAME_INVALID", f"namespace {namespace[:80]!r} is invalid; use lowercase "
                      "letters and digits, separated by '.', '_', '__' or '-'")
    if namespace in RESERVED_NAMESPACES:
        raise _refuse("NAME_INVALID", f"namespace {namespace!r} is reserved by the server; "
                      f"choose another (reserved: {', '.join(sorted(RESERVED_NAMESPACES))})")
    return namespace


def namespace_of(repository: str) -> str:
    """The namespace (first component) of a checked repository name."""
    return repository.split("/", 1)[0]


def check_tag(tag: str) -> str:
    """Return ``tag`` if it follows the OCI tag grammar (at most 128 characters)."""
    if not _TAG.fullmatch(tag):
        raise _refuse("TAG_INVALID", f"tag {tag[:140]!r} is invalid; use up to 128 letters, "
                      "digits, '_', '.' and '-', not starting with '.' or '-'")
    return tag


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is ``sha256:<64 lowercase hex>`` (the only algorithm served)."""
    if not _DIGEST.fullmatch(digest):
        raise _refuse("DIGEST_INVALID", f"digest {digest[:80]!r} is invalid; this registry "
                      "accepts 'sha256:' followed by 64 lowercase hex digits")
    return digest


def check_upload_id(upload: str) -> str:
    """Return ``upload`` if it has the shape of an id this server hands out."""
    if not _UPLOAD.fullmatch(upload):
        raise RequestRefused(404, "BLOB_UPLOAD_UNKNOWN", f"upload {upload[:80]!r} is unknown")
    return upload
