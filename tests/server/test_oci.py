"""The OCI distribution API of `graft serve`, spoken over HTTP to the real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from graft.hub.oci import artifact
from tests.conftest import env_with_src
from tests.server.conftest import module_blobs, push_blob, push_module, sha


def test_push_then_pull_every_blob_and_the_manifest(server, modules):
    token = server.token("vision")
    with server.client(token) as c:
        response = push_module(c, "vision/tiny-cnn", modules["parent"])
        assert response.status_code == 201, response.text
        data, blobs = module_blobs(modules["parent"])
        assert response.headers["docker-content-digest"] == sha(data)
    with server.client() as anon:  # public read: no token
        got = anon.get("/v2/vision/tiny-cnn/manifests/1.0.0",
                       headers={"Accept": artifact.MANIFEST_TYPE})
        assert got.status_code == 200 and got.content == data
        assert got.headers["content-type"] == artifact.MANIFEST_TYPE
        by_digest = anon.get(f"/v2/vision/tiny-cnn/manifests/{sha(data)}")
        assert by_digest.content == data
        head = anon.head("/v2/vision/tiny-cnn/manifests/1.0.0")
        assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)
        for digest, blob in blobs.items():
            got = anon.get(f"/v2/vision/tiny-cnn/blobs/{digest}")
            assert got.status_code == 200 and got.content == blob
            assert got.headers["docker-content-digest"] == digest
        # A resumed download: Range gives the tail.
        digest, blob = max(blobs.items(), key=lambda kv: len(kv[1]))
        part = anon.get(f"/v2/vision/tiny-cnn/blobs/{digest}", headers={"Range": "bytes=10-"})
        assert part.status_code == 206 and part.content == blob[10:]
        # Blobs are visible per repository: another one does not serve them.
        assert anon.head(f"/v2/vision/other/blobs/{digest}").status_code == 404


def test_chunked_upload_with_content_range_and_resume_offset(server):
    token = server.token("ns")
    data = os.urandom(300_000)
    with server.client(token) as c:
        start = c.post("/v2/ns/blob/blobs/uploads/")
        assert start.status_code == 202
        location = start.headers["location"]
        first = c.patch(location, content=data[:100_000],
                        headers={"Content-Range": "0-99999"})
        assert first.status_code == 202 and first.headers["range"] == "0-99999"
        # A chunk that does not start at the offset is refused with the offset to resume at.
        wrong = c.patch(location, content=data[200_000:], headers={"Content-Range":
                                                                   "200000-299999"})
        assert wrong.status_code == 416
        assert c.get(location).headers["range"] == "0-99999"
        c.patch(location, content=data[100_000:250_000])
        done = c.put(location, params={"digest": sha(data)}, content=data[250_000:])
        assert done.status_code == 201, done.text
        assert c.get(f"/v2/ns/blob/blobs/{sha(data)}").content == data
        # The finished session is gone.
        assert c.get(location).status_code == 404


def test_cross_repository_mount_links_without_bytes(server):
    token = server.token("ns")
    blob = os.urandom(5000)
    with server.client(token) as c:
        assert push_blob(c, "ns/parent", blob).status_code == 201
        mounted = c.post("/v2/ns/child/blobs/uploads/",
                         params={"mount": sha(blob), "from": "ns/parent"})
        assert mounted.status_code == 201
        assert mounted.headers["location"] == f"/v2/ns/child/blobs/{sha(blob)}"
        assert c.get(f"/v2/ns/child/blobs/{sha(blob)}").content == blob
        # A blob the source does not have falls back to an upload session (202).
        missing = c.post("/v2/ns/child/blobs/uploads/",
                         params={"mount": sha(b"nope"), "from": "ns/parent"})
        assert missing.status_code == 202


def test_mount_from_a_private_namespace_needs_its_token(server):
    secret_token = server.token("secret", private=True)
    blob = os.urandom(100)
    with server.client(secret_token) as c:
        assert push_blob(c, "secret/m", blob).status_code == 201
    with server.client(server.token("other")) as c:
        response = c.post("/v2/other/m/blobs/uploads/",
                          params={"mount": sha(blob), "from": "secret/m"})
        assert response.status_code == 202  # no link: the blob stays invisible
        assert c.head(f"/v2/other/m/blobs/{sha(blob)}").status_code == 404


def test_tags_list_paginates_and_referrers_list_children(server, modules):
    token = server.token("vision")
    with server.client(token) as c:
        parent = push_module(c, "vision/tiny-cnn", modules["parent"])
        parent_digest = parent.headers["docker-content-digest"]
        # An artifact about the parent (a signature, an evaluation report) names it as its
        # subject; the referrers API lists it under the parent.
        size = len(c.get("/v2/vision/tiny-cnn/manifests/1.0.0").content)
        config, layer = b"{}", b"accuracy: 0.9"
        push_blob(c, "vision/tiny-cnn", config)
        push_blob(c, "vision/tiny-cnn", layer)
        data = json.dumps({
            "schemaVersion": 2, "mediaType": artifact.MANIFEST_TYPE,
            "artifactType": "application/vnd.example.report",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(config),
                       "size": len(config)},
            "layers": [{"mediaType": "text/plain", "digest": sha(layer), "size": len(layer)}],
            "subject": {"mediaType": artifact.MANIFEST_TYPE, "digest": parent_digest,
                        "size": size},
        }).encode()
        child = c.put(f"/v2/vision/tiny-cnn/manifests/{sha(data)}", content=data,
                      headers={"Content-Type": artifact.MANIFEST_TYPE})
        assert child.status_code == 201, child.text
        assert child.headers["oci-subject"] == parent_digest
        # Generic (non-version) tags move; pagination with n and last.
        for tag in ("a", "b", "c"):
            assert c.put(f"/v2/vision/tiny-cnn/manifests/{tag}", content=data,
                         headers={"Content-Type": artifact.MANIFEST_TYPE}).status_code == 201
        page = c.get("/v2/vision/tiny-cnn/tags/list", params={"n": 2})
        assert page.json()["tags"] == ["1.0.0", "a"]
        assert 'rel="next"' in page.headers["link"]
        rest = c.get("/v2/vision/tiny-cnn/tags/list", params={"n": 10, "last": "a"})
        assert rest.json()["tags"] == ["b", "c"]
        referrers = c.get(f"/v2/vision/tiny-cnn/referrers/{parent_digest}").json()
        assert [m["digest"] for m in referrers["manifests"]] == [sha(data)]
        assert referrers["manifests"][0]["artifactType"] == "application/vnd.example.report"
        filtered = c.get(f"/v2/vision/tiny-cnn/referrers/{parent_digest}",
                         params={"artifactType": "application/x-other"})
        assert filtered.json()["manifests"] == []
        assert filtered.headers["oci-filters-applied"] == "artifactType"


def test_version_is_immutable_other_content_is_409_and_history_kept(server, modules, tmp_path):
    from tests.server.conftest import save_tiny

    token = server.token("vision")
    other = save_tiny(tmp_path / "other", seed=7)  # same name and version, other weights
    with server.client(token) as c:
        first = push_module(c, "vision/tiny-cnn", modules["parent"])
        assert first.status_code == 201
        again = push_module(c, "vision/tiny-cnn", modules["parent"])
        assert again.status_code == 201  # the same content again is fine
        conflict = push_module(c, "vision/tiny-cnn", other)
        assert conflict.status_code == 409
        assert "immutable" in conflict.json()["errors"][0]["message"]
        got = c.get("/v2/vision/tiny-cnn/manifests/1.0.0")
        assert got.headers["docker-content-digest"] == first.headers["docker-content-digest"]
        # Deleting is refused: history is never rewritten.
        assert c.delete("/v2/vision/tiny-cnn/manifests/1.0.0").status_code == 405


def test_yank_hides_from_latest_but_stays_pullable(server, modules, tmp_path):
    from tests.server.conftest import save_tiny

    token = server.token("vision")
    newer = save_tiny(tmp_path / "v2", version="2.0.0", seed=3)
    with server.client(token) as c:
        v1 = push_module(c, "vision/tiny-cnn", modules["parent"]).headers["docker-content-digest"]
        v2 = push_module(c, "vision/tiny-cnn", newer, tag="2.0.0")
        v2 = v2.headers["docker-content-digest"]
        assert c.get("/v2/vision/tiny-cnn/manifests/latest").headers[
            "docker-content-digest"] == v2
        yank = c.post("/api/v1/modules/vision/tiny-cnn/yank", params={"version": "2.0.0"})
        assert yank.status_code == 200, yank.text
        assert c.get("/v2/vision/tiny-cnn/manifests/latest").headers[
            "docker-content-digest"] == v1
        assert c.get(f"/v2/vision/tiny-cnn/manifests/{v2}").status_code == 200
        found = c.get("/api/v1/search", params={"q": "tiny"}).json()["results"]
        assert [(m["repository"], m["version"]) for m in found] == [("vision/tiny-cnn", "1.0.0")]
    with server.client() as anon:  # yanking needs a push token
        assert anon.post("/api/v1/modules/vision/tiny-cnn/unyank",
                         params={"version": "2.0.0"}).status_code == 401
        # The operator's command, beside the running server, undoes the yank.
        out = subprocess.run([sys.executable, "-m", "graft.cli", "serve", "yank",
                              "vision/tiny-cnn", "2.0.0", "--undo", "--root", str(server.root)],
                             capture_output=True, text=True, env=env_with_src(), timeout=60)
        assert out.returncode == 0 and out.stdout.startswith("unyanked vision/tiny-cnn:2.0.0")
        assert anon.get("/v2/vision/tiny-cnn/manifests/latest").headers[
            "docker-content-digest"] == v2
        missing = subprocess.run([sys.executable, "-m", "graft.cli", "serve", "yank",
                                  "vision/tiny-cnn", "9.9.9", "--root", str(server.root)],
                                 capture_output=True, text=True, env=env_with_src(), timeout=60)
        assert missing.returncode == 1 and "has no module version '9.9.9'" in missing.stderr
    events = subprocess.run(
        [sys.executable, "-c", "import sqlite3,sys; print([tuple(r) for r in sqlite3.connect("
         "sys.argv[1]).execute('SELECT tag, event FROM tag_events ORDER BY id')])",
         str(server.root / "registry.sqlite")], capture_output=True, text=True, check=True)
    assert events.stdout.strip() == str([("1.0.0", "push"), ("2.0.0", "push"),
                                          ("2.0.0", "yank"), ("2.0.0", "unyank")])


def test_concurrent_pushes_of_one_version_exactly_one_wins(server, modules, tmp_path):
    from tests.server.conftest import save_tiny

    token = server.token("vision")
    contenders = [save_tiny(tmp_path / f"c{i}", seed=10 + i) for i in range(4)]
    prepared = []
    with server.client(token) as c:
        for directory in contenders:  # every blob first, so only the manifests race
            data, blobs = module_blobs(directory)
            for blob in blobs.values():
                assert push_blob(c, "vision/race", blob).status_code == 201
            prepared.append(data)

    def put(data: bytes) -> int:
        with server.client(token) as c:
            return c.put("/v2/vision/race/manifests/1.0.0", content=data,
                         headers={"Content-Type": artifact.MANIFEST_TYPE}).status_code

    with ThreadPoolExecutor(len(prepared)) as pool:
        codes = list(pool.map(put, prepared))
    assert sorted(codes) == [201, 409, 409, 409]
    with server.client() as c:
        served = c.get("/v2/vision/race/manifests/1.0.0").content
        assert served == prepared[codes.index(201)]
        assert c.get("/v2/vision/race/tags/list").json()["tags"] == ["1.0.0"]


def test_generic_oci_artifact_is_stored_without_graft_checks(server):
    token = server.token("ns")
    config, layer = b"{}", b"hello"
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": artifact.MANIFEST_TYPE,
        "artifactType": "application/vnd.example+type",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(config),
                   "size": len(config)},
        "layers": [{"mediaType": "text/plain", "digest": sha(layer), "size": len(layer)}],
    }).encode()
    with server.client(token) as c:
        push_blob(c, "ns/generic", config)
        push_blob(c, "ns/generic", layer)
        assert c.put("/v2/ns/generic/manifests/v1", content=manifest,
                     headers={"Content-Type": artifact.MANIFEST_TYPE}).status_code == 201
        assert c.get("/v2/ns/generic/manifests/v1").content == manifest
        assert c.get("/api/v1/search", params={"q": "generic"}).json()["results"] == []
        catalog = c.get("/v2/_catalog").json()["repositories"]
        assert catalog == ["ns/generic"]


def test_graft_search_cli_prints_the_load_reference(server, modules):
    token = server.token("vision")
    with server.client(token) as c:
        assert push_module(c, "vision/tiny-cnn", modules["parent"]).status_code == 201
    out = subprocess.run([sys.executable, "-m", "graft.cli", "search", "input:float32[batch,3",
                          "--registry", server.host], capture_output=True, text=True,
                         env=env_with_src(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"oci://{server.host}/vision/tiny-cnn:1.0.0" in out.stdout
    assert "images: float32[batch,3,16,16]" in out.stdout
    none = subprocess.run([sys.executable, "-m", "graft.cli", "search", "nothing-like-this",
                           "--registry", server.host], capture_output=True, text=True,
                          env=env_with_src(), timeout=60)
    assert none.returncode == 0 and "no modules match" in none.stdout


def test_a_second_chunk_while_one_is_being_written_is_refused_not_interleaved(server):
    import threading
    import time

    token = server.token("ns")
    first, second = os.urandom(70_000), os.urandom(1000)
    release = threading.Event()

    def slow_body():
        yield first[:40_000]
        release.wait(timeout=60)
        yield first[40_000:]

    with server.client(token) as c:
        location = c.post("/v2/ns/m/blobs/uploads/").headers["location"]
        results: dict[str, int] = {}

        def send_slow() -> None:
            with server.client(token) as other:
                results["slow"] = other.patch(location, content=slow_body()).status_code

        thread = threading.Thread(target=send_slow)
        thread.start()
        try:
            for _ in range(400):  # bounded: until the server has the first part on disk
                if c.get(location).headers["range"] != "0-0":
                    break
                time.sleep(0.025)
            busy = c.patch(location, content=second)
            assert busy.status_code == 416 and "another chunk" in busy.text
        finally:
            release.set()
            thread.join(timeout=60)
        assert results["slow"] == 202
        done = c.put(location, params={"digest": sha(first + second)}, content=second)
        assert done.status_code == 201, done.text
        assert c.get(f"/v2/ns/m/blobs/{sha(first + second)}").content == first + second
