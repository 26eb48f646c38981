"""Tokens and who may do what: namespaces owned by tokens, public read by default.

A token is ``graft_<id>_<secret>``. The server stores the id, the namespace, the scope and the
sha256 of ``id:secret``; the secret itself is shown once, by ``graft serve token create``, and
is never stored, logged or put in a URL. Checking a token looks the row up by its id and
compares hashes in constant time (:func:`hmac.compare_digest`).

Rules: anyone may pull from a public namespace; a private namespace needs a token of that
namespace; pushing, mounting and yanking need a ``push`` token of that namespace. A request
without credentials where they are needed gets 401 with a challenge (Docker's token flow); a
valid token of another namespace, or a ``pull`` token used to push, gets 403.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from graft.errors import RequestRefused
from graft.server.db import Database, now
from graft.server.names import check_namespace, namespace_of

__all__ = ["ANONYMOUS", "Credentials", "Grant", "authorize", "create_token", "parse_token",
           "set_private"]

#: The token handed to a client that asks the token endpoint without credentials; it grants
#: what an anonymous request may do (public pulls) and nothing else.
ANONYMOUS = "anonymous"
SCOPES = ("pull", "push")
_TOKEN = re.compile(r"graft_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


@dataclass(frozen=True)
class Grant:
    """What a checked token allows."""

    token_id: str
    namespace: str
    scope: str


def _hash(token_id: str, secret: str) -> str:
    return hashlib.sha256(f"{token_id}:{secret}".encode()).hexdigest()


def create_token(db: Database, namespace: str, scope: str = "push") -> str:
    """Create a token for ``namespace`` and return it (the only time it is seen).

    Raises:
        RequestRefused: the namespace or scope is invalid.
    """
    check_namespace(namespace)
    if scope not in SCOPES:
        raise RequestRefused(400, "DENIED", f"scope {scope!r} is unknown; use pull or push")
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    with db.write() as conn:
        conn.execute("INSERT OR IGNORE INTO namespaces (name, private, created) VALUES (?, 0, ?)",
                     (namespace, now()))
        conn.execute("INSERT INTO tokens (id, hash, namespace, scope, created) "
                     "VALUES (?, ?, ?, ?, ?)", (token_id, _hash(token_id, secret), namespace,
                                                scope, now()))
    return f"graft_{token_id}_{secret}"


def set_private(db: Database, namespace: str, private: bool) -> None:
    """Make a namespace private (pulls need one of its tokens) or public again."""
    check_namespace(namespace)
    with db.write() as conn:
        conn.execute("INSERT INTO namespaces (name, private, created) VALUES (?, ?, ?) "
                     "ON CONFLICT (name) DO UPDATE SET private = excluded.private",
                     (namespace, int(private), now()))


def parse_token(db: Database, token: str) -> Grant | None:
    """The grant of a valid token, None for the anonymous token.

    Raises:
        RequestRefused: 401 when the token is malformed, unknown or does not match.
    """
    if token == ANONYMOUS:
        return None
    match = _TOKEN.fullmatch(token)
    row = db.row("SELECT hash, namespace, scope FROM tokens WHERE id = ?",
                 match.group(1)) if match else None
    expected = row["hash"] if row else _hash("0" * 16, "x")
    actual = _hash(match.group(1), match.group(2)) if match else _hash("1" * 16, "y")
    # The comparison runs whether or not the id was found, so timing says nothing either way.
    if not hmac.compare_digest(expected, actual) or row is None:
        raise RequestRefused(401, "UNAUTHORIZED", "the token is malformed, unknown or revoked; "
                             "create one with `graft serve token create --namespace NS`")
    return Grant(match.group(1), row["namespace"], row["scope"])


class Credentials:
    """The token a request carries: ``Authorization: Bearer TOKEN`` or Basic with the token as
    the password (what skopeo and docker send with ``--creds user:TOKEN``)."""

    @staticmethod
    def token(authorization: str | None) -> str | None:
        if not authorization:
            return None
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            return value
        if scheme.lower() == "basic" and value:
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise RequestRefused(401, "UNAUTHORIZED", "the Basic credentials are not "
                                     "base64 of 'user:token'") from None
            return decoded.partition(":")[2] or None
        raise RequestRefused(401, "UNAUTHORIZED", "the Authorization header must be "
                             "'Bearer TOKEN' or Basic with the token as the password")


def authorize(db: Database, authorization: str | None, repo: str, action: str) -> Grant | None:
    """Check that a request may ``pull`` from or ``push`` to ``repo``.

    Returns:
        The grant of the request's token, or None for an allowed anonymous pull.

    Raises:
        RequestRefused: 401 without (valid) credentials where they are needed; 403 for a token
            of another namespace or of too narrow a scope.
    """
    token = Credentials.token(authorization)
    grant = parse_token(db, token) if token else None
    namespace = namespace_of(repo)
    if action == "pull" and grant is None and not db.is_private(namespace):
        return None
    if grant is None:
        what = "pushing to" if action == "push" else "pulling from the private namespace of"
        raise RequestRefused(401, "UNAUTHORIZED", f"{what} {repo} needs a token; pass it as "
                             "'Authorization: Bearer TOKEN' (GRAFT_TOKEN for the graft client)")
    if grant.namespace != namespace:
        raise RequestRefused(403, "DENIED", f"this token belongs to namespace "
                             f"{grant.namespace!r}, not {namespace!r}")
    if action == "push" and grant.scope != "push":
        raise RequestRefused(403, "DENIED", f"this token of {namespace!r} may only pull; "
                             "pushing needs a token created with --scope push")
    return grant
