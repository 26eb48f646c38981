"""Push and pull against the real CNCF distribution registry (Debian's docker-registry 2.8)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from graft.errors import ModuleNotFound, RegistryAuthError, RegistryError
from graft.hub.oci import pull, push
from graft.hub.oci.client import RegistryClient
from graft.hub.oci.referrers import fallback_tag, referrers
from graft.hub.store import Store
from tests.conftest import env_with_src
from tests.hub.oci.conftest import SKOPEO, start_registry

WEIGHTS = "weights.safetensors"


def weights_size(directory: Path) -> int:
    return (directory / WEIGHTS).stat().st_size


def graft_cli(*args: str, home: Path, stdin: str | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {**env_with_src(), "GRAFT_HOME": str(home), **(env or {})}
    return subprocess.run([sys.executable, "-m", "graft.cli", *args], capture_output=True,
                          text=True, env=full, input=stdin, timeout=300)


def test_round_trip_into_an_empty_store_in_another_process(registry, local, saved, tmp_path):
    parent = push("net@1.0.0", registry.ref("zoo/net"), store=local)
    child = push("net-pets@1.0.0", registry.ref("team/net-pets"), store=local)
    assert parent.module_digest == saved.parent_manifest.digest
    assert child.module_digest == saved.child_manifest.digest
    home = tmp_path / "empty-home"
    for ref in (registry.ref("zoo/net:1.0.0"), child.reference):
        out = graft_cli("pull", ref, home=home)
        assert out.returncode == 0, out.stderr
    for handle in ("net@1.0.0", "net-pets@1.0.0"):
        out = graft_cli("verify", handle, home=home)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("ok:")
    pulled = Store(home)
    for name, source in (("net", saved.parent), ("net-pets", saved.child)):
        # the store keeps tensors apart; exported, the module is its source byte for byte
        exported = pulled.export(f"{name}@1.0.0", tmp_path / f"exported-{name}")
        for rel in json.loads((source / "graft.json").read_text())["files"]:
            assert (exported / rel).read_bytes() == (source / rel).read_bytes(), rel
    import torch

    import graft

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for name, source in (("net", saved.parent), ("net-pets", saved.child)):
            mine = graft.load(source)(x)
            theirs = graft.load(f"{name}@1.0.0", store=pulled)(x)
            torch.testing.assert_close(theirs, mine, rtol=0, atol=0)


def test_a_child_sends_and_fetches_only_what_it_changed(registry, local, saved, tmp_path):
    push("net@1.0.0", registry.ref("dedup/net"), store=local)
    result = push("net-pets@1.0.0", registry.ref("dedup/net-pets"), store=local)
    parent_bytes = weights_size(saved.parent)
    assert result.mounted > 0  # the backbone's tensors came from the parent's repository
    assert result.bytes_sent <= 0.05 * parent_bytes, (result.bytes_sent, parent_bytes)
    assert result.subject is not None

    fresh = Store(tmp_path / "fresh")
    pull(registry.ref("dedup/net:1.0.0"), store=fresh)
    with RegistryClient(registry.address) as client:
        pull(result.reference, store=fresh, client=client)
        assert client.bytes_received <= 0.05 * parent_bytes, client.bytes_received
    assert fresh.resolve("net-pets@1.0.0").digest == saved.child_manifest.digest


def test_the_registry_lists_a_modules_children(registry, local, saved):
    parent = push("net@1.0.0", registry.ref("family/net"), store=local)
    child = push("net-pets@1.0.0", registry.ref("family/net"), store=local)
    assert child.subject == parent.manifest_digest
    with RegistryClient(registry.address) as client:
        kids = referrers(client, "family/net", parent.manifest_digest)
        # distribution 2.8 has no referrers API: the fallback tag holds the index
        tag = fallback_tag(parent.manifest_digest)
        index = client.request("GET", f"/v2/family/net/manifests/{tag}",
                               scope="repository:family/net:pull",
                               headers={"Accept": "application/vnd.oci.image.index.v1+json"})
    assert [k.digest for k in kids] == [child.manifest_digest]
    assert kids[0].annotations["org.opencontainers.image.title"] == "net-pets"
    assert json.loads(index.content)["manifests"][0]["digest"] == child.manifest_digest
    # a child in another repository: the parent's manifest is copied there as its subject
    other = push("net-pets@1.0.0", registry.ref("elsewhere/net-pets:1.0.0"), store=local)
    with RegistryClient(registry.address) as client:
        kids = referrers(client, "elsewhere/net-pets", parent.manifest_digest)
    assert [k.digest for k in kids] == [other.manifest_digest]
    out = graft_cli("inspect", "net@1.0.0", home=local.root)  # where the pushes were recorded
    assert out.returncode == 0, out.stderr
    assert "children" in out.stdout and child.manifest_digest in out.stdout


def test_chunked_uploads_reassemble(registry, local, saved, tmp_path):
    result = push("net@1.0.0", registry.ref("chunked/net"), store=local, chunk_size=64 << 10)
    assert result.uploaded > 0
    fresh = Store(tmp_path / "fresh")
    stored = pull(result.reference, store=fresh)
    exported = fresh.export(stored.pinned_handle, tmp_path / "exported")
    assert (exported / WEIGHTS).read_bytes() == (saved.parent / WEIGHTS).read_bytes()


def test_pushing_twice_sends_no_blob(registry, local):
    push("net@1.0.0", registry.ref("twice/net"), store=local)
    again = push("net@1.0.0", registry.ref("twice/net"), store=local)
    assert again.uploaded == 0 and again.mounted == 0 and again.present > 0


@pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed (.ci/system-packages)")
def test_skopeo_sees_and_copies_what_graft_pushed(registry, local, saved, tmp_path):
    result = push("net@1.0.0", registry.ref("interop/net"), store=local)
    raw = subprocess.run([SKOPEO, "inspect", "--raw", "--tls-verify=false",
                          f"docker://{registry.address}/interop/net:1.0.0"],
                         capture_output=True, timeout=120, check=True).stdout
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == result.manifest_digest
    body = json.loads(raw)
    assert body["artifactType"] == "application/vnd.graft.module.v1+json"
    assert body["config"]["digest"] == saved.parent_manifest.digest
    layout = tmp_path / "layout"
    subprocess.run([SKOPEO, "copy", "--src-tls-verify=false",
                    f"docker://{registry.address}/interop/net:1.0.0", f"oci:{layout}:net"],
                   capture_output=True, timeout=300, check=True)
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["digest"] == result.manifest_digest
    for layer in [body["config"], *body["layers"]]:
        blob = layout / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == layer["digest"][7:]


def test_offline_and_pinned_handles_never_touch_the_network(tmp_path, local, saved,
                                                            monkeypatch):
    import graft

    reg = start_registry(tmp_path / "short-lived")
    try:
        result = push("net@1.0.0", reg.ref("zoo/net"), store=local)
        fresh = Store(tmp_path / "fresh")
        pull(reg.ref("zoo/net:1.0.0"), store=fresh)
        monkeypatch.setenv("GRAFT_OFFLINE", "1")
        with pytest.raises(ModuleNotFound, match="GRAFT_OFFLINE=1"):
            pull(reg.ref("zoo/net-pets:1.0.0"), store=fresh)
        monkeypatch.delenv("GRAFT_OFFLINE")
    finally:
        reg.stop()  # from here on, the registry is down
    stored = pull(result.reference, store=fresh)  # pinned and local: no network
    assert stored.digest == saved.parent_manifest.digest
    module = graft.load(result.reference, store=fresh)
    assert module.name == "net"
    with pytest.raises(RegistryError, match="cannot reach"):
        pull(reg.ref("zoo/net:1.0.0"), store=fresh)  # a tag may have moved: ask, and fail
    monkeypatch.setenv("GRAFT_OFFLINE", "1")
    assert pull(reg.ref("zoo/net:1.0.0"), store=fresh).digest == stored.digest  # last seen


def test_an_authenticated_registry_needs_login(auth_registry, local, tmp_path):
    home = Path(os.environ["GRAFT_HOME"])
    ref = auth_registry.ref("private/net")
    with pytest.raises(RegistryAuthError, match=f"graft login {auth_registry.address}"):
        push("net@1.0.0", ref, store=local)
    bad = graft_cli("login", auth_registry.address, "-u", "graft", "--password-stdin",
                    home=home, stdin="wrong-pw\n")
    assert bad.returncode == 1 and "wrong-pw" not in bad.stderr + bad.stdout
    assert len(bad.stderr.strip().splitlines()) == 1
    assert not (home / "credentials.json").exists()
    good = graft_cli("login", auth_registry.address, "-u", "graft", "--password-stdin",
                     home=home, stdin="s3cret-pw\n")
    assert good.returncode == 0, good.stderr
    assert "s3cret-pw" not in good.stdout + good.stderr
    creds = home / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    result = push("net@1.0.0", ref, store=local)
    fresh = Store(tmp_path / "fresh")
    assert pull(result.reference, store=fresh).name == "net"
    os.chmod(creds, 0o644)  # readable by others: refused, not used
    with pytest.raises(RegistryAuthError, match="chmod 600"):
        pull(ref + ":1.0.0", store=Store(tmp_path / "other"))


def test_the_cli_pushes_and_errors_are_one_line(registry, saved, tmp_path):
    from tests.hub.oci.hostile import free_port

    home = tmp_path / "home"
    assert graft_cli("add", str(saved.parent), home=home).returncode == 0
    out = graft_cli("push", "net@1.0.0", registry.ref("cli/net"), home=home)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"pushed {registry.ref('cli/net')}@sha256:")
    dead = f"oci://127.0.0.1:{free_port()}/cli/net:1.0.0"
    for env, words in (({}, "cannot reach the registry"), ({"GRAFT_OFFLINE": "1"},
                                                             "GRAFT_OFFLINE=1")):
        out = graft_cli("pull", dead, home=tmp_path / "empty", env=env)
        assert out.returncode == 1
        assert len(out.stderr.strip().splitlines()) == 1 and words in out.stderr
        assert "Traceback" not in out.stderr


def test_the_bearer_token_flow_against_the_real_registry(token_registry, local, saved,
                                                         tmp_path):
    from graft.hub.oci.credentials import Credentials

    registry, service = token_registry
    ref = registry.ref("secure/net")
    with pytest.raises(RegistryAuthError, match="refused anonymous access"):
        push("net@1.0.0", ref, store=local)
    creds = Credentials(username="graft", password="tok3n-pw")
    with RegistryClient(registry.address, credentials=creds) as client:
        result = push("net@1.0.0", ref, store=local, client=client)
    fresh = Store(tmp_path / "fresh")
    with RegistryClient(registry.address, credentials=creds) as client:
        assert pull(result.reference, store=fresh, client=client).digest == \
            saved.parent_manifest.digest
    granted = {(a["name"], tuple(a["actions"])) for c in service.issued for a in c["access"]}
    assert ("secure/net", ("pull", "push")) in granted and ("secure/net", ("pull",)) in granted
    wrong = Credentials(username="graft", password="nope")
    with RegistryClient(registry.address, credentials=wrong) as client:
        with pytest.raises(RegistryAuthError, match="refused the credentials") as info:
            pull(result.reference, store=Store(tmp_path / "other"), client=client)
    assert "nope" not in str(info.value)
