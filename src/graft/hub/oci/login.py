"""``graft login``: check credentials against a registry, then keep them (mode 0600)."""

from __future__ import annotations

from pathlib import Path

from graft.errors import HandleError
from graft.hub.oci.client import RegistryClient
from graft.hub.oci.credentials import Credentials, remember
from graft.hub.oci.reference import parse_reference

__all__ = ["login"]


def login(registry: str, username: str, password: str, *, verify: bool = True) -> Path:
    """Store credentials for ``registry`` (``host[:port]``), after the registry accepts them.

    Args:
        registry: ``host[:port]`` (an ``oci://`` reference is accepted; its host is used).
        username: The account name.
        password: Its password or access token.
        verify: Ask the registry's ``/v2/`` endpoint first, so that a typo is caught now.

    Returns:
        The credentials file.

    Raises:
        RegistryAuthError: the registry refuses the credentials.
        RegistryError: it cannot be reached.
    """
    if registry.lower().startswith("oci://"):
        registry = parse_reference(registry if "/" in registry[6:] else registry + "/x").registry
    if not registry or "/" in registry or registry != registry.strip():
        raise HandleError(f"graft login takes a registry host such as 'registry.example.com' "
                          f"or 'localhost:5000', got {registry!r}")
    if verify:
        creds = Credentials(username=username, password=password)
        with RegistryClient(registry, credentials=creds, retries=1) as client:
            client.request("GET", "/v2/", scope="")  # no scope: what `docker login` asks
    return remember(registry, username, password)
