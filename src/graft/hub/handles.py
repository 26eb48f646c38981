"""Handles: the strings that name a module.

Three kinds:

- store: ``name`` (the latest version), ``name@1.0.0``, ``name@sha256:<64 hex>``, resolved in
  the local store;
- path: a module directory, given as a ``pathlib.Path``, a string that is absolute or starts
  with ``./``, ``../`` or ``~`` or contains ``/``, or a ``file://`` URL;
- url: ``http://`` or ``https://`` (a remote registry);
- oci: ``oci://host[:port]/ns/name[:tag|@sha256:<hex>]``, a module on an OCI registry
  (``graft.hub.oci`` pulls it; ``name`` is the repository's last part, ``url`` the reference).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from graft.errors import FormatError, HandleError
from graft.format.manifest import validate_name, validate_version

__all__ = ["Handle", "is_store_handle", "parse_handle"]

_KINDS = ("store", "path", "url", "oci")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_ACCEPTED = ("accepted forms: 'name' (latest version), 'name@1.0.0', 'name@sha256:<64 hex>', "
             "a module directory ('./dir', '/abs/dir', '~/dir', 'file:///abs/dir' or a "
             "pathlib.Path), or an 'https://host/...' URL")


@dataclass(frozen=True)
class Handle:
    """A parsed handle.

    Args:
        kind: ``"store"``, ``"path"``, ``"url"`` or ``"oci"``.
        name: The module name (store handles; url handles whose last part names one).
        version: The pinned version, if any.
        digest: The pinned ``sha256:<hex>`` digest, if any.
        path: The module directory (path handles), with ``~`` expanded.
        url: The URL (url handles; the normalised reference for oci handles).
    """

    kind: str
    name: str | None = None
    version: str | None = None
    digest: str | None = None
    path: Path | None = None
    url: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise HandleError(f"handle kind {self.kind!r} is unknown; expected one of {_KINDS}")
        if self.kind == "store" and self.name is None:
            raise HandleError("a store handle needs a module name")
        if self.kind == "path" and self.path is None:
            raise HandleError("a path handle needs a path")
        if self.kind in ("url", "oci") and self.url is None:
            raise HandleError(f"a {self.kind} handle needs a URL")
        if self.version is not None and self.digest is not None:
            raise HandleError("a handle pins either a version or a digest, not both")
        if self.digest is not None and not _DIGEST.fullmatch(self.digest):
            raise HandleError(f"digest {self.digest!r} is malformed; expected 'sha256:' and 64 "
                              "lowercase hex digits")

    @property
    def pinned(self) -> bool:
        """Whether the handle names one module forever (by digest) or one version."""
        return self.version is not None or self.digest is not None

    def __str__(self) -> str:
        if self.kind == "path":
            return str(self.path)
        if self.kind in ("url", "oci"):
            return str(self.url)
        pin = self.version or self.digest
        return f"{self.name}@{pin}" if pin else str(self.name)


def parse_handle(text: str | os.PathLike[str] | Handle) -> Handle:
    """Parse a handle string (or path) into a :class:`Handle`.

    Args:
        text: A store handle, a module directory or a URL; a ``Handle`` passes through.

    Raises:
        HandleError: ``text`` is none of the accepted forms.
    """
    if isinstance(text, Handle):
        return text
    if isinstance(text, os.PathLike) and not isinstance(text, str):
        raw = os.fspath(text)
        if isinstance(raw, bytes):
            raise HandleError(f"handle {text!r} is a bytes path; pass a str or pathlib.Path")
        return Handle("path", path=Path(raw).expanduser())
    if not isinstance(text, str):
        raise HandleError(f"handle must be a str or a path, got {type(text).__name__} "
                          f"{text!r}; {_ACCEPTED}")
    if not text or text != text.strip():
        raise HandleError(f"handle {text!r} is empty or has surrounding whitespace; {_ACCEPTED}")
    match = _SCHEME.match(text)
    scheme = match.group(1).lower() if match else ""
    if scheme in ("http", "https"):
        return _parse_url(text)
    if scheme == "file":
        return _parse_file_url(text)
    if scheme == "oci":
        from graft.hub.oci.reference import parse_reference

        ref = parse_reference(text)  # an OCI registry: graft.hub.oci pulls it
        return Handle("oci", name=ref.name, url=str(ref))
    if scheme:
        raise HandleError(f"handle {text!r} uses the unsupported scheme {scheme!r}; "
                          f"{_ACCEPTED}")
    if _looks_like_path(text):
        return Handle("path", path=Path(text).expanduser())
    return _parse_store(text)


def is_store_handle(text: str | os.PathLike[str] | Handle) -> bool:
    """Whether ``text`` is a well-formed handle of a module in the local store."""
    try:
        return parse_handle(text).kind == "store"
    except HandleError:
        return False


def _looks_like_path(text: str) -> bool:
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return (text in (".", "..") or os.path.isabs(text) or text.startswith("~")
            or any(sep in text for sep in seps))


def _parse_store(text: str) -> Handle:
    name, sep, pin = text.partition("@")
    try:
        validate_name(name)
    except FormatError as exc:
        raise HandleError(f"handle {text!r} is malformed: {exc}; {_ACCEPTED}") from None
    if not sep:
        return Handle("store", name=name)
    if pin.lower().startswith("sha256:"):
        digest = pin.lower()
        if not _DIGEST.fullmatch(digest):
            raise HandleError(f"handle {text!r} has a malformed digest; expected "
                              f"'{name}@sha256:' followed by 64 hex digits; {_ACCEPTED}")
        return Handle("store", name=name, digest=digest)
    try:
        validate_version(pin)
    except FormatError as exc:
        raise HandleError(f"handle {text!r} is malformed: {exc}; {_ACCEPTED}") from None
    return Handle("store", name=name, version=pin)


def _parse_url(text: str) -> Handle:
    parts = urlsplit(text)
    if not parts.hostname:
        raise HandleError(f"URL handle {text!r} has no host; expected e.g. "
                          "'https://host/namespace/name@1.0.0'")
    name = version = digest = None
    last = parts.path.rstrip("/").rsplit("/", 1)[-1]
    if last:
        try:
            store = _parse_store(unquote(last))
        except HandleError:
            pass  # the remote client decides what the rest of the URL means
        else:
            name, version, digest = store.name, store.version, store.digest
    return Handle("url", name=name, version=version, digest=digest, url=text)


def _parse_file_url(text: str) -> Handle:
    parts = urlsplit(text)
    path = unquote(parts.path)
    if parts.netloc not in ("", "localhost") or not path.startswith("/"):
        raise HandleError(f"file URL {text!r} must hold an absolute local path, e.g. "
                          "'file:///home/me/modules/tiny-cnn'")
    return Handle("path", path=Path(path))
