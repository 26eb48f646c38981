"""Registry credentials: ``$GRAFT_TOKEN`` or the file ``graft login`` writes.

The file (``$GRAFT_CREDENTIALS``, default ``$GRAFT_HOME/credentials.json``) maps a registry
(``host[:port]``) to a username and password (or an identity token, sent as the password of
the token exchange). It is created with mode 0600 and refused when others can read it. Secrets
never appear in a message, a log line or a ``repr``.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from graft._fs import atomic_write
from graft.errors import FormatError, RegistryAuthError
from graft.format import jsonio
from graft.settings import credentials_path, registry_token

__all__ = ["Credentials", "credentials_for", "forget", "remember"]

_MAX_FILE = 1 << 20


@dataclass(frozen=True)
class Credentials:
    """What to answer a registry's challenge with.

    Args:
        username: For HTTP basic auth and the token exchange.
        password: Its password or identity token.
        token: A bearer token sent as is (``$GRAFT_TOKEN``).
    """

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @property
    def basic(self) -> tuple[str, str] | None:
        """``(username, password)`` when both are known."""
        if self.username is not None and self.password is not None:
            return self.username, self.password
        return None

    def __repr__(self) -> str:  # never show a secret, even in a traceback
        hidden = {k: "***" if getattr(self, k) else None for k in ("password", "token")}
        return (f"Credentials(username={self.username!r}, password={hidden['password']}, "
                f"token={hidden['token']})")


def credentials_for(registry: str) -> Credentials:
    """The credentials for ``registry`` (``host[:port]``): the file's entry, plus
    ``$GRAFT_TOKEN`` as the bearer token when it is set."""
    entry = _read().get(registry.lower(), {})
    return Credentials(username=entry.get("username"), password=entry.get("password"),
                       token=registry_token())


def remember(registry: str, username: str, password: str) -> Path:
    """Store the credentials of ``registry`` in the credentials file (mode 0600)."""
    if not username or not password:
        raise RegistryAuthError("graft login needs a username and a non-empty password "
                                "(or identity token)")
    entries = _read()
    entries[registry.lower()] = {"username": username, "password": password}
    return _write(entries)


def forget(registry: str) -> bool:
    """Remove the credentials of ``registry``; True when there were some."""
    entries = _read()
    if entries.pop(registry.lower(), None) is None:
        return False
    _write(entries)
    return True


def _read() -> dict[str, dict[str, str]]:
    path = credentials_path()
    try:
        st = path.stat()
    except FileNotFoundError:
        return {}
    if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise RegistryAuthError(f"the credentials file {path} can be read by other users (mode "
                                f"{stat.S_IMODE(st.st_mode):o}); run `chmod 600 {path}` or "
                                "`graft login` again")
    try:
        data = jsonio.loads(path.read_bytes(), what=str(path), max_bytes=_MAX_FILE)
    except FormatError as exc:
        raise RegistryAuthError(f"the credentials file {path} is unreadable ({exc}); delete "
                                "it and run `graft login HOST` again") from None
    registries = data.get("registries") if isinstance(data, dict) else None
    if not isinstance(registries, dict):
        raise RegistryAuthError(f"the credentials file {path} has no 'registries' object; "
                                "delete it and run `graft login HOST` again")
    out = {}
    for host, entry in registries.items():
        if (isinstance(entry, dict) and isinstance(entry.get("username"), str)
                and isinstance(entry.get("password"), str)):
            out[host.lower()] = {"username": entry["username"], "password": entry["password"]}
    return out


def _write(entries: dict[str, dict[str, str]]) -> Path:
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"registries": entries}, indent=2, sort_keys=True) + "\n"
    # The umask makes the temporary file 0600 from its first byte, before the rename.
    previous = os.umask(0o077)
    try:
        atomic_write(path, payload)
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    return path
