"""References to modules on an OCI registry: ``oci://HOST[:PORT]/NS/NAME[:TAG|@sha256:HEX]``.

The repository is everything between the host and the tag (one or more ``/``-separated
components, OCI's lowercase grammar), and its last component is the module's name. The tag is
the module's version, with ``+`` (allowed in a Graft version, not in an OCI tag) written as
``_``. ``@sha256:`` pins the OCI manifest's digest, the name every OCI tool shows; the Graft
module digest is the digest of the artifact's config blob.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from graft.errors import HandleError
from graft.format.manifest import validate_version

__all__ = ["Reference", "parse_reference", "tag_for_version"]

_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
                   r"|\[[0-9A-Fa-f:.]+\])(?::(\d{1,5}))?$")
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_FORM = "expected 'oci://HOST[:PORT]/NAMESPACE/NAME[:VERSION|@sha256:<64 hex>]'"
_MAX_REPOSITORY = 255


@dataclass(frozen=True)
class Reference:
    """A parsed ``oci://`` reference.

    Args:
        registry: ``host`` or ``host:port``, as written (the host lowercased).
        repository: ``namespace/name`` (one or more components).
        tag: The tag, if the reference names one.
        digest: The OCI manifest digest ``sha256:<hex>``, if pinned.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """The last component of the repository: the module's name."""
        return self.repository.rsplit("/", 1)[-1]

    @property
    def host(self) -> str:
        """The host without the port."""
        return _split_port(self.registry)[0]

    def with_tag(self, tag: str) -> Reference:
        """The same repository under another tag (and no digest)."""
        return Reference(self.registry, self.repository, tag=tag)

    def with_digest(self, digest: str) -> Reference:
        """The same repository, pinned to one manifest digest."""
        return Reference(self.registry, self.repository, digest=digest)

    @property
    def target(self) -> str | None:
        """What goes after ``/manifests/``: the digest if pinned, else the tag."""
        return self.digest or self.tag

    def __str__(self) -> str:
        pin = f"@{self.digest}" if self.digest else f":{self.tag}" if self.tag else ""
        return f"oci://{self.registry}/{self.repository}{pin}"


def parse_reference(text: str) -> Reference:
    """Parse ``oci://HOST[:PORT]/NS/NAME[:TAG|@sha256:HEX]``.

    Raises:
        HandleError: the text is not such a reference (the message says which part is wrong).
    """
    if not isinstance(text, str) or not text.lower().startswith("oci://"):
        raise HandleError(f"registry reference {text!r} does not start with 'oci://'; {_FORM}")
    rest = text[len("oci://"):]
    registry, slash, path = rest.partition("/")
    if not slash or not path:
        raise HandleError(f"registry reference {text!r} names no repository; {_FORM}")
    match = _HOST.fullmatch(registry)
    if match is None or (match.group(1) is not None and not 0 < int(match.group(1)) < 65536):
        raise HandleError(f"registry reference {text!r} has a malformed host {registry!r}; "
                          f"{_FORM}")
    host, port = _split_port(registry)
    registry = host.lower() + (f":{port}" if port else "")
    tag = digest = None
    if "@" in path:
        path, _, digest = path.partition("@")
        if not _DIGEST.fullmatch(digest):
            raise HandleError(f"registry reference {text!r} has a malformed digest {digest!r}; "
                              "expected 'sha256:' and 64 lowercase hex digits")
    else:
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            path, _, tag = path.rpartition(":")
            if not _TAG.fullmatch(tag):
                raise HandleError(f"registry reference {text!r} has a malformed tag {tag!r}; "
                                  "a tag is up to 128 letters, digits, '_', '.' or '-'")
    components = path.split("/")
    if len(path) > _MAX_REPOSITORY or not all(_COMPONENT.fullmatch(c) for c in components):
        raise HandleError(f"registry reference {text!r} has a malformed repository {path!r}; "
                          "each '/'-separated part is lowercase letters and digits, joined by "
                          f"'.', '_' or '-'; {_FORM}")
    return Reference(registry, path, tag=tag, digest=digest)


def tag_for_version(version: str) -> str:
    """The OCI tag a module version is pushed under (``+`` becomes ``_``)."""
    return validate_version(version).replace("+", "_")


def _split_port(registry: str) -> tuple[str, str | None]:
    if registry.startswith("["):
        host, _, port = registry[1:].partition("]")
        return f"[{host}]", port.removeprefix(":") or None
    host, _, port = registry.partition(":")
    return host, port or None
