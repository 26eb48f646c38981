"""Bad input and crashes: each refused with a status code and a clear message, nothing stored;
after a SIGKILL at a named point, what was committed is served and nothing half-pushed is."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import httpx
import pytest

from graft._fs import sha256_bytes
from graft.format.entries import FileEntry
from graft.format.manifest import Manifest
from graft.hub.oci import artifact
from tests.server.conftest import module_blobs, push_blob, push_module, sha


def _blob_files(server) -> set[str]:
    return {p.name for p in (server.root / "blobs").rglob("*") if p.is_file()}


def _message(response: httpx.Response) -> str:
    return response.json()["errors"][0]["message"]


def test_digest_mismatch_is_400_and_nothing_is_stored(server):
    token = server.token("ns")
    with server.client(token) as c:
        response = c.post("/v2/ns/m/blobs/uploads/", params={"digest": sha(b"other")},
                          content=b"data")
        assert response.status_code == 400
        assert "hash to" in _message(response) and "nothing was stored" in _message(response)
        assert c.head(f"/v2/ns/m/blobs/{sha(b'data')}").status_code == 404
        assert c.head(f"/v2/ns/m/blobs/{sha(b'other')}").status_code == 404
    assert _blob_files(server) == set()
    assert list((server.root / "uploads").iterdir()) == []


def test_size_mismatches_are_400(server, modules):
    token = server.token("ns")
    with server.client(token) as c:
        location = c.post("/v2/ns/m/blobs/uploads/").headers["location"]
        response = c.patch(location, content=b"12345", headers={"Content-Range": "0-9"})
        assert response.status_code == 400 and "declares 10 bytes" in _message(response)
        assert c.get(location).headers["range"] == "0-0"  # the chunk left nothing behind
        # A manifest whose descriptor gives a blob the wrong size.
        data, blobs = module_blobs(modules["parent"])
        for blob in blobs.values():
            push_blob(c, "ns/m", blob)
        body = json.loads(data)
        body["layers"][0]["size"] += 1
        response = c.put("/v2/ns/m/manifests/1.0.0", content=json.dumps(body).encode(),
                         headers={"Content-Type": artifact.MANIFEST_TYPE})
        assert response.status_code == 400 and response.json()["errors"][0]["code"] == \
            "SIZE_INVALID"
        assert c.get("/v2/ns/m/manifests/1.0.0").status_code == 404


def test_upload_over_the_limit_is_413_and_nothing_is_stored(serve):
    server = serve("--max-upload-bytes", "1000")
    token = server.token("ns")
    with server.client(token) as c:
        big = os.urandom(1500)
        response = push_blob(c, "ns/m", big)
        assert response.status_code == 413 and "limit of 1000 bytes" in _message(response)
        location = c.post("/v2/ns/m/blobs/uploads/").headers["location"]
        assert c.patch(location, content=big[:800]).status_code == 202
        assert c.patch(location, content=big[800:]).status_code == 413
        assert c.put(location, params={"digest": sha(big)}).status_code == 400
        assert push_blob(c, "ns/m", big[:1000]).status_code == 201  # at the limit is fine
    assert _blob_files(server) == {sha(big[:1000])[7:]}


@pytest.mark.parametrize("path", [
    "/v2/ns/../etc/blobs/uploads/", "/v2/ns/%2e%2e/x/blobs/uploads/", "/v2/ns//x/blobs/uploads/",
    "/v2/single/blobs/uploads/", "/v2/ns/a%00b/blobs/uploads/", "/v2/ns/UPPER/blobs/uploads/",
    "/v2/" + "a" * 200 + "/" + "b" * 100 + "/blobs/uploads/", "/v2/v2/x/blobs/uploads/",
])
def test_bad_repository_names_are_400(server, path):
    token = server.token("ns")
    with server.client(token) as c:
        response = c.post(path)
        assert response.status_code == 400, path
        assert response.json()["errors"][0]["code"] == "NAME_INVALID"


def test_bad_digests_and_tags_are_400(server):
    token = server.token("ns")
    with server.client(token) as c:
        escape = c.get("/v2/ns/m/blobs/sha256:..%2f..%2f..%2fregistry.sqlite")
        assert escape.status_code in (400, 404) and b"SQLite" not in escape.content
        assert c.get("/v2/ns/m/blobs/sha256:" + "g" * 64).status_code == 400
        assert c.post("/v2/ns/m/blobs/uploads/", params={"digest": "md5:abc"},
                      content=b"x").status_code == 400
        assert c.put("/v2/ns/m/manifests/-bad", content=b"{}").status_code == 400
        assert c.put("/v2/ns/m/manifests/" + "t" * 129, content=b"{}").status_code == 400
        assert c.get("/v2/ns/m/blobs/uploads/..%2f..%2fx").status_code in (400, 404)


def test_manifest_naming_never_uploaded_blobs_is_400(server, modules):
    token = server.token("ns")
    data, blobs = module_blobs(modules["parent"])
    with server.client(token) as c:
        for digest, blob in list(blobs.items())[:-1]:  # all but the last
            push_blob(c, "ns/m", blob)
        response = c.put("/v2/ns/m/manifests/1.0.0", content=data,
                         headers={"Content-Type": artifact.MANIFEST_TYPE})
        assert response.status_code == 400
        assert response.json()["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
        assert "never uploaded" in _message(response)
        # A blob of another repository is not "uploaded here" either.
        push_blob(c, "ns/elsewhere", list(blobs.values())[-1])
        response = c.put("/v2/ns/m/manifests/1.0.0", content=data,
                         headers={"Content-Type": artifact.MANIFEST_TYPE})
        assert response.status_code == 400
        assert c.get("/v2/ns/m/manifests/1.0.0").status_code == 404


def _push_tampered(server, modules, tmp_path, edit) -> httpx.Response:
    """Push the parent module after ``edit(directory, files)`` changed it; the manifest is
    rewritten to match, so only the server's own checks can refuse it."""
    directory = tmp_path / "tampered"
    shutil.copytree(modules["parent"], directory)
    module = Manifest.read(directory)
    files = dict(module.files)
    edit(directory, files)
    for rel in list(files):
        data = (directory / rel).read_bytes()
        files[rel] = FileEntry(sha256_bytes(data), len(data))
    dataclasses.replace(module, files=files).write(directory)
    token = server.token("ns")
    with server.client(token) as c:
        return push_module(c, "ns/tampered", directory)


def test_module_whose_program_validation_refuses_is_400_at_push(server, modules, tmp_path):
    def hostile_program(directory, files):
        path = directory / "programs" / "forward.eval.json"
        path.write_text(path.read_text().replace("aten.relu.default", "builtins.exec"))

    response = _push_tampered(server, modules, tmp_path, hostile_program)
    assert response.status_code == 400, response.text
    assert "refused" in _message(response) and "builtins.exec" in _message(response)
    with server.client() as c:
        assert c.get("/v2/ns/tampered/manifests/1.0.0").status_code == 404
        assert c.get("/api/v1/search", params={"q": "tiny"}).json()["results"] == []


def test_module_holding_a_pickle_is_400_at_push(server, modules, tmp_path):
    def add_pickle(directory, files):
        (directory / "assets").mkdir(exist_ok=True)
        (directory / "assets" / "labels.txt").write_bytes(
            b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93.")
        files["assets/labels.txt"] = FileEntry("0" * 64, 0)

    response = _push_tampered(server, modules, tmp_path, add_pickle)
    assert response.status_code == 400 and "pickle" in _message(response)


def test_config_that_is_not_a_valid_graft_json_is_400(server, modules):
    token = server.token("ns")
    data, blobs = module_blobs(modules["parent"])
    body = json.loads(data)
    bad_config = b'{"format": "graft.module/1", "name": "x"}'
    body["config"] = {"mediaType": artifact.CONFIG_TYPE, "digest": sha(bad_config),
                      "size": len(bad_config)}
    with server.client(token) as c:
        for blob in [*blobs.values(), bad_config]:
            push_blob(c, "ns/m", blob)
        response = c.put("/v2/ns/m/manifests/1.0.0", content=json.dumps(body).encode(),
                         headers={"Content-Type": artifact.MANIFEST_TYPE})
        assert response.status_code == 400 and "graft.json" in _message(response)
        not_json = b"\x80not json"
        body["config"] = {"mediaType": artifact.CONFIG_TYPE, "digest": sha(not_json),
                          "size": len(not_json)}
        push_blob(c, "ns/m", not_json)
        response = c.put("/v2/ns/m/manifests/1.0.0", content=json.dumps(body).encode(),
                         headers={"Content-Type": artifact.MANIFEST_TYPE})
        assert response.status_code == 400 and "not valid UTF-8 JSON" in _message(response)
        assert c.put("/v2/ns/m/manifests/1.0.0", content=b"[1, 2",
                     headers={"Content-Type": artifact.MANIFEST_TYPE}).status_code == 400
        assert c.get("/v2/ns/m/manifests/1.0.0").status_code == 404


# -- SIGKILL at named points -------------------------------------------------------------------


@pytest.mark.parametrize("point", ["serve.upload-chunk", "serve.blob-file-written",
                                   "serve.manifest-bytes-written",
                                   "serve.manifest-before-commit"])
def test_sigkill_mid_push_leaves_committed_served_and_half_pushed_invisible(
        serve, tmp_path, modules, point):
    root = tmp_path / "registry"
    first = serve(root=root)
    token = first.token("vision")
    with first.client(token) as c:  # committed before the crash
        assert push_module(c, "vision/tiny-cnn", modules["parent"]).status_code == 201
    first.stop()
    crashing = serve(root=root, env={"GRAFT_TEST_STOP_AT": point})
    data, blobs = module_blobs(modules["child"])
    with crashing.client(token) as c:
        with pytest.raises(httpx.TransportError):
            for blob in blobs.values():
                location = c.post("/v2/vision/tiny-pets/blobs/uploads/").headers["location"]
                c.patch(location, content=blob)
                c.put(location, params={"digest": sha(blob)})
            c.put("/v2/vision/tiny-pets/manifests/1.0.0", content=data,
                  headers={"Content-Type": artifact.MANIFEST_TYPE})
    assert crashing.proc.wait(timeout=30) == -9  # it died at the point, by SIGKILL
    restarted = serve(root=root)
    parent_data, parent_blobs = module_blobs(modules["parent"])
    with restarted.client() as c:
        assert c.get("/v2/vision/tiny-cnn/manifests/1.0.0").content == parent_data
        for digest, blob in parent_blobs.items():
            assert c.get(f"/v2/vision/tiny-cnn/blobs/{digest}").content == blob
        assert c.get("/v2/vision/tiny-pets/manifests/1.0.0").status_code == 404
        assert c.get("/v2/vision/tiny-pets/tags/list").status_code == 404
        found = c.get("/api/v1/search", params={"q": "pets"}).json()["results"]
        assert found == []
        if point in ("serve.upload-chunk", "serve.blob-file-written"):
            # The blob being uploaded when the server died is not visible; its bytes (a
            # partial upload file, or an unlinked blob file) are not served.
            assert all(c.head(f"/v2/vision/tiny-pets/blobs/{d}").status_code == 404
                       for d in blobs)
    with restarted.client(token) as c:  # and the push can simply be done again
        assert push_module(c, "vision/tiny-pets", modules["child"]).status_code == 201


def test_index_naming_an_unknown_manifest_and_mismatched_media_types_are_400(server):
    token = server.token("ns")
    config, layer = b"{}", b"x"
    image = json.dumps({
        "schemaVersion": 2, "mediaType": artifact.MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(config),
                   "size": len(config)},
        "layers": [{"mediaType": "text/plain", "digest": sha(layer), "size": len(layer)}],
    }).encode()
    index = json.dumps({"schemaVersion": 2, "mediaType": artifact.INDEX_TYPE, "manifests": [
        {"mediaType": artifact.MANIFEST_TYPE, "digest": sha(image), "size": len(image)}]}).encode()
    with server.client(token) as c:
        push_blob(c, "ns/m", config)
        push_blob(c, "ns/m", layer)
        response = c.put("/v2/ns/m/manifests/all", content=index,
                         headers={"Content-Type": artifact.INDEX_TYPE})
        assert response.status_code == 400
        assert response.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        mismatch = c.put("/v2/ns/m/manifests/one", content=image,
                         headers={"Content-Type": artifact.INDEX_TYPE})
        assert mismatch.status_code == 400 and "Content-Type" in _message(mismatch)
        assert c.put("/v2/ns/m/manifests/one", content=image,
                     headers={"Content-Type": artifact.MANIFEST_TYPE}).status_code == 201
        assert c.put("/v2/ns/m/manifests/all", content=index,
                     headers={"Content-Type": artifact.INDEX_TYPE}).status_code == 201
        assert c.get("/v2/ns/m/manifests/all").headers["content-type"] == artifact.INDEX_TYPE
        wrong = c.put(f"/v2/ns/m/manifests/{sha(b'other')}", content=image,
                      headers={"Content-Type": artifact.MANIFEST_TYPE})
        assert wrong.status_code == 400 and wrong.json()["errors"][0]["code"] == "DIGEST_INVALID"
