"""Tokens: 401 without, 403 for another namespace, private namespaces, hashed storage, and
no token in the server's log or in any URL."""

from __future__ import annotations

import base64
import os
import sqlite3
import subprocess

from tests.server.conftest import push_blob, push_module, sha


def _nothing_stored(server) -> None:
    blobs = [p for p in (server.root / "blobs").rglob("*") if p.is_file()]
    uploads = list((server.root / "uploads").iterdir())
    assert blobs == [] and uploads == []


def test_push_without_token_is_401_with_a_challenge_and_stores_nothing(server):
    with server.client() as c:
        response = push_blob(c, "vision/m", b"data")
        assert response.status_code == 401
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith(f'Bearer realm="{server.url}/v2/token"')
        assert 'scope="repository:vision/m:pull,push"' in challenge
        assert "needs a token" in response.json()["errors"][0]["message"]
        assert c.post("/v2/vision/m/blobs/uploads/").status_code == 401
    _nothing_stored(server)


def test_bad_token_is_401_other_namespace_is_403_pull_scope_is_403(server):
    own = server.token("vision")
    other = server.token("text")
    reader = server.token("vision", scope="pull")
    with server.client("graft_0123456789abcdef_" + "x" * 43) as c:
        assert push_blob(c, "vision/m", b"data").status_code == 401
    with server.client(own[:-1] + ("A" if own[-1] != "A" else "B")) as c:  # one char off
        assert push_blob(c, "vision/m", b"data").status_code == 401
    with server.client(other) as c:
        response = push_blob(c, "vision/m", b"data")
        assert response.status_code == 403
        assert "belongs to namespace 'text'" in response.json()["errors"][0]["message"]
    with server.client(reader) as c:
        response = push_blob(c, "vision/m", b"data")
        assert response.status_code == 403 and "only pull" in response.text
    _nothing_stored(server)
    with server.client(own) as c:
        assert push_blob(c, "vision/m", b"data").status_code == 201


def test_private_namespace_needs_its_token_to_pull_list_search_and_view(server, modules):
    token = server.token("secret", private=True)
    with server.client(token) as c:
        assert push_module(c, "secret/tiny-cnn", modules["parent"]).status_code == 201
        assert c.get("/v2/secret/tiny-cnn/manifests/1.0.0").status_code == 200
        assert len(c.get("/api/v1/search", params={"q": "tiny"}).json()["results"]) == 1
        assert c.get("/secret/tiny-cnn").status_code == 200
    with server.client() as anon:
        assert anon.get("/v2/secret/tiny-cnn/manifests/1.0.0").status_code == 401
        assert anon.get("/v2/secret/tiny-cnn/tags/list").status_code == 401
        assert anon.get("/api/v1/search", params={"q": "tiny"}).json()["results"] == []
        assert anon.get("/secret/tiny-cnn").status_code == 404
        assert anon.get("/v2/_catalog").json()["repositories"] == []
    with server.client(server.token("other")) as c:
        assert c.get("/v2/secret/tiny-cnn/manifests/1.0.0").status_code == 403


def test_token_flow_and_basic_auth_and_no_secret_in_logs_or_database(server, modules, tmp_path):
    token = server.token("vision")
    secret = token.rsplit("_", 1)[1]
    basic = base64.b64encode(f"anyone:{token}".encode()).decode()
    with server.client() as c:
        # Docker's token flow: challenge, then the realm with Basic credentials.
        assert c.get("/v2/").status_code == 401
        issued = c.get("/v2/token", params={"service": "graft-serve",
                                            "scope": "repository:vision/m:pull,push"},
                       headers={"Authorization": f"Basic {basic}"})
        assert issued.status_code == 200
        bearer = issued.json()["token"]
        assert c.get("/v2/", headers={"Authorization": f"Bearer {bearer}"}).status_code == 200
        anonymous = c.get("/v2/token").json()["token"]
        assert push_blob(c, "vision/m", b"x").status_code == 401  # anonymous cannot push
        assert c.get("/v2/", headers={"Authorization": f"Bearer {anonymous}"}).status_code == 200
        assert c.post("/v2/vision/m/blobs/uploads/", params={"digest": sha(b"y")},
                      content=b"y", headers={"Authorization": f"Basic {basic}"}
                      ).status_code == 201
    # skopeo with --creds sends the token as a Basic password through the same flow.
    layout = tmp_path / "layout"
    _write_layout(layout, modules["parent"])
    out = subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", "--dest-creds",
                          f"ci:{token}", f"oci:{layout}:1.0.0",
                          f"docker://{server.host}/vision/tiny-cnn:1.0.0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    server.stop()
    logs = server.logs()
    assert "/v2/vision/tiny-cnn/manifests/1.0.0" in logs  # the log does record requests
    assert secret not in logs and token not in logs and basic not in logs
    with sqlite3.connect(server.root / "registry.sqlite") as db:
        dump = "\n".join(db.iterdump())
    assert secret not in dump
    assert token.split("_")[1] in dump  # the public id is what the row is found by


def _write_layout(layout, directory) -> None:
    """An OCI image layout holding one Graft module (for skopeo's oci: transport)."""
    import json

    from graft.hub.oci import artifact
    from tests.server.conftest import module_blobs

    data, blobs = module_blobs(directory)
    (layout / "blobs" / "sha256").mkdir(parents=True)
    for digest, blob in {**blobs, sha(data): data}.items():
        (layout / "blobs" / "sha256" / digest[7:]).write_bytes(blob)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": artifact.INDEX_TYPE,
        "manifests": [{"mediaType": artifact.MANIFEST_TYPE, "digest": sha(data),
                       "size": len(data), "artifactType": artifact.ARTIFACT_TYPE,
                       "annotations": {"org.opencontainers.image.ref.name": "1.0.0"}}]}))


def test_token_create_prints_the_token_last_and_refuses_bad_namespaces(server):
    import sys

    from tests.conftest import env_with_src

    out = subprocess.run([sys.executable, "-m", "graft.cli", "serve", "token", "create",
                          "--root", str(server.root), "--namespace", "bad/ns"],
                         capture_output=True, text=True, env=env_with_src(), timeout=60)
    assert out.returncode == 1 and "namespace 'bad/ns' is invalid" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    token = server.token("good")
    assert token.startswith("graft_") and len(token) == 6 + 16 + 1 + 43
    assert os.path.exists(server.root / "registry.sqlite")


def test_namespace_command_makes_a_namespace_private_and_public_again(server, modules):
    import sys

    from tests.conftest import env_with_src

    token = server.token("vision")
    with server.client(token) as c:
        assert push_module(c, "vision/tiny-cnn", modules["parent"]).status_code == 201

    def visibility(value: str) -> None:
        out = subprocess.run([sys.executable, "-m", "graft.cli", "serve", "namespace", "vision",
                              value, "--root", str(server.root)], capture_output=True,
                             text=True, env=env_with_src(), timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == f"namespace vision is {value}"

    with server.client() as anon:
        assert anon.get("/v2/vision/tiny-cnn/manifests/1.0.0").status_code == 200
        visibility("private")
        assert anon.get("/v2/vision/tiny-cnn/manifests/1.0.0").status_code == 401
        assert anon.get("/vision/tiny-cnn").status_code == 404
        visibility("public")
        assert anon.get("/v2/vision/tiny-cnn/manifests/1.0.0").status_code == 200
