"""The client against a registry with the OCI 1.1 referrers API (``graft serve``): a child's
push is listed under its parent by the registry itself (no fallback tag written), and
``graft inspect`` shows it through ``GET /v2/<name>/referrers/<digest>``."""

from __future__ import annotations

import pytest

from graft.hub.oci import push
from graft.hub.oci.client import RegistryClient
from graft.hub.oci.referrers import fallback_tag, referrers
from graft.hub.store import Store
from tests.hub.oci.test_registry import graft_cli
from tests.server.conftest import start_server


@pytest.fixture
def serve(tmp_path):
    server = start_server(tmp_path / "registry")
    yield server
    server.stop()


def test_inspect_lists_children_through_the_referrers_api(serve, saved, tmp_path,
                                                          monkeypatch):
    token = serve.token("zoo")
    monkeypatch.setenv("GRAFT_TOKEN", token)
    store = Store(tmp_path / "home")
    store.add(saved.parent)
    store.add(saved.child)
    parent = push("net@1.0.0", f"oci://{serve.host}/zoo/net", store=store)
    # graft serve keeps versions immutable: the child goes beside its parent under its own tag
    child = push("net-pets@1.0.0", f"oci://{serve.host}/zoo/net:pets-1.0.0", store=store)
    elsewhere = push("net-pets@1.0.0", f"oci://{serve.host}/zoo/net-pets", store=store)
    assert child.subject == parent.manifest_digest == elsewhere.subject

    with RegistryClient(serve.host) as client:
        for repo, kid in (("zoo/net", child), ("zoo/net-pets", elsewhere)):
            # the registry answered the PUT with OCI-Subject: the client wrote no fallback
            fallback = fallback_tag(parent.manifest_digest)
            tag = client.request("GET", f"/v2/{repo}/manifests/{fallback}",
                                 scope=f"repository:{repo}:pull", allow=(404,),
                                 headers={"Accept": "application/vnd.oci.image.index.v1+json"})
            assert tag.status_code == 404
            api = client.request("GET", f"/v2/{repo}/referrers/{parent.manifest_digest}",
                                 scope=f"repository:{repo}:pull")
            assert [m["digest"] for m in api.json()["manifests"]] == [kid.manifest_digest]
            found = referrers(client, repo, parent.manifest_digest)
            assert [d.digest for d in found] == [kid.manifest_digest]
            assert found[0].annotations["org.opencontainers.image.title"] == "net-pets"

    out = graft_cli("inspect", "net@1.0.0", home=store.root, env={"GRAFT_TOKEN": token})
    assert out.returncode == 0, out.stderr
    children = out.stdout.split("  children\n", 1)[1].split("\n\n", 1)[0]
    assert f"oci://{serve.host}/zoo/net@{child.manifest_digest}" in children
    assert token not in out.stdout + out.stderr
