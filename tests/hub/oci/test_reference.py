"""oci:// references, handles, and the credentials file."""

from __future__ import annotations

import os
import stat

import pytest

from graft.errors import HandleError, RegistryAuthError
from graft.hub.handles import parse_handle
from graft.hub.oci.credentials import Credentials, credentials_for, forget, remember
from graft.hub.oci.reference import parse_reference, tag_for_version


@pytest.mark.parametrize("text, registry, repository, tag, digest", [
    ("oci://registry.example.com/team/pets:1.0.0", "registry.example.com", "team/pets",
     "1.0.0", None),
    ("oci://LOCALHOST:5000/a/b/c", "localhost:5000", "a/b/c", None, None),
    ("oci://127.0.0.1:5000/zoo/net@sha256:" + "a" * 64, "127.0.0.1:5000", "zoo/net", None,
     "sha256:" + "a" * 64),
    ("oci://[::1]:5000/zoo/net:2", "[::1]:5000", "zoo/net", "2", None),
])
def test_references_parse(text, registry, repository, tag, digest):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag,
                                                                   digest)
    assert parse_reference(str(ref)) == ref
    handle = parse_handle(text)
    assert handle.kind == "oci" and handle.name == repository.rsplit("/", 1)[-1]


@pytest.mark.parametrize("text, words", [
    ("oci://host", "names no repository"),
    ("oci://host:99999/a/b", "malformed host"),
    ("oci://host/Team/pets", "malformed repository"),
    ("oci://host/team/pets:1.0+build", "malformed tag"),
    ("oci://host/team/pets@sha256:abc", "malformed digest"),
    ("oci://host/team/../pets", "malformed repository"),
    ("https://host/team/pets", "does not start with 'oci://'"),
])
def test_malformed_references_are_refused(text, words):
    with pytest.raises(HandleError, match=words):
        parse_reference(text)


def test_versions_become_tags():
    assert tag_for_version("1.0.0+build.5") == "1.0.0_build.5"


def test_credentials_file_is_private_and_secrets_never_show(graft_home, monkeypatch):
    monkeypatch.delenv("GRAFT_TOKEN", raising=False)
    path = remember("Registry.Example.com", "alice", "hunter2-pw")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    creds = credentials_for("registry.example.com")
    assert creds.basic == ("alice", "hunter2-pw")
    assert "hunter2" not in repr(creds) and "hunter2" not in str(creds)
    monkeypatch.setenv("GRAFT_TOKEN", "tok-XYZ")
    assert credentials_for("other.example.com") == Credentials(token="tok-XYZ")
    assert "tok-XYZ" not in repr(credentials_for("other.example.com"))
    assert forget("registry.example.com") and credentials_for("registry.example.com").basic is None
    os.chmod(path, 0o640)
    with pytest.raises(RegistryAuthError, match="chmod 600"):
        credentials_for("registry.example.com")
