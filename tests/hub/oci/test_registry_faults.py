"""Bad registries: each lie or failure is refused with a clear error, and nothing is stored."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from graft.errors import (
    FormatError,
    IntegrityError,
    ModuleNotFound,
    RegistryAuthError,
    RegistryError,
)
from graft.format.manifest import Manifest, canonical_json
from graft.hub.oci.artifact import CONFIG_TYPE, build_manifest
from graft.hub.oci.client import RegistryClient
from graft.hub.oci.credentials import Credentials
from graft.hub.oci.pull import pull
from graft.hub.store import Store

from tests.hub.oci.hostile import Hostile, free_port


@pytest.fixture
def hostile():
    server = Hostile()
    yield server
    server.close()


@pytest.fixture
def published(hostile, saved):
    return hostile.serve_module(saved.parent, "team/backbone")


def client(server: Hostile, sleeps: list[float] | None = None, **kw) -> RegistryClient:
    return RegistryClient(server.address, backoff=0.01,
                          sleep=(sleeps.append if sleeps is not None else lambda s: None), **kw)


def assert_nothing_stored(store: Store) -> None:
    """No module, no store blob; the download cache holds only verified blobs (kept so that
    a retry fetches less)."""
    assert store.list() == []
    for folder in ("modules", "blobs"):
        path = store.root / folder
        assert not path.exists() or not [p for p in path.rglob("*") if p.is_file()]
    cache = store.root / "oci-cache" / "blobs"
    for blob in cache.iterdir() if cache.exists() else []:
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


def test_an_honest_server_round_trips(hostile, published, tmp_path):
    store = Store(tmp_path / "store")
    stored = pull(f"oci://{hostile.address}/team/backbone:1.0.0", store=store,
                  client=client(hostile))
    assert stored.digest == published["module"].digest
    assert store.verify(stored.pinned_handle).digest == stored.digest
    # downloaded blobs leave the cache once the module holds them
    assert list((store.root / "oci-cache" / "blobs").iterdir()) == []


def test_a_blob_with_other_bytes_is_refused(hostile, published, tmp_path):
    tensor = max((d for _, d in published["plan"].tensors), key=lambda d: d.size)
    good = hostile.behaviour.blobs[tensor.digest]
    hostile.behaviour.blobs[tensor.digest] = bytes(len(good))  # same size, other bytes
    store = Store(tmp_path / "store")
    with pytest.raises(IntegrityError, match="does not match its digest"):
        pull(f"oci://{hostile.address}/team/backbone:1.0.0", store=store, client=client(hostile))
    assert_nothing_stored(store)
    assert not (store.root / "oci-cache" / "partial" / f"{tensor.hex}.part").exists()


def test_an_endless_blob_is_cut_off_at_its_declared_size(hostile, published, tmp_path):
    tensor = max((d for _, d in published["plan"].tensors), key=lambda d: d.size)
    hostile.behaviour.endless.add(tensor.digest)
    store = Store(tmp_path / "store")
    with pytest.raises(IntegrityError, match="longer than"):
        pull(f"oci://{hostile.address}/team/backbone:1.0.0", store=store, client=client(hostile))
    assert_nothing_stored(store)
    partial = store.root / "oci-cache" / "partial" / f"{tensor.hex}.part"
    assert not partial.exists()


def test_a_truncated_blob_is_retried_then_refused(hostile, published, tmp_path):
    tensor = max((d for _, d in published["plan"].tensors), key=lambda d: d.size)
    hostile.behaviour.truncated[tensor.digest] = tensor.size // 3
    store = Store(tmp_path / "store")
    with pytest.raises(RegistryError, match="truncated"):
        pull(f"oci://{hostile.address}/team/backbone:1.0.0", store=store, client=client(hostile))
    assert_nothing_stored(store)
    gets = hostile.requests("GET", tensor.digest)
    assert 1 < len(gets) <= 5  # bounded retries


def test_a_dropped_connection_resumes_with_a_range_request(hostile, published, tmp_path):
    tensor = max((d for _, d in published["plan"].tensors), key=lambda d: d.size)
    hostile.behaviour.drop_after[tensor.digest] = tensor.size // 2
    store = Store(tmp_path / "store")
    stored = pull(f"oci://{hostile.address}/team/backbone:1.0.0", store=store,
                  client=client(hostile))
    assert stored.digest == published["module"].digest
    ranges = [r["headers"].get("range") for r in hostile.requests("GET", tensor.digest)]
    assert ranges == [None, f"bytes={tensor.size // 2}-"]


def _republish(hostile: Hostile, published: dict, config: bytes, **changes) -> str:
    """Serve a manifest whose config blob is ``config`` (and layers changed by ``changes``)."""
    body = json.loads(published["manifest"])
    digest = hostile.put_blob(config)
    body["config"] = {"mediaType": CONFIG_TYPE, "digest": digest, "size": len(config)}
    for key, value in changes.items():
        body[key] = value
    hostile.put_manifest("team/bad", "1.0.0", canonical_json(body))
    return f"oci://{hostile.address}/team/bad:1.0.0"


def test_a_config_that_is_not_graft_json_is_refused(hostile, published, tmp_path):
    ref = _republish(hostile, published, b'{"format": "not-graft", "name": 1}')
    store = Store(tmp_path / "store")
    with pytest.raises(FormatError, match="not a valid graft.json"):
        pull(ref, store=store, client=client(hostile))
    assert_nothing_stored(store)


def test_layers_that_do_not_match_the_manifest_are_refused(hostile, published, tmp_path):
    body = json.loads(published["manifest"])
    layers = body["layers"][:-1]  # one tensor missing
    ref = _republish(hostile, published, published["module"].canonical(), layers=layers)
    store = Store(tmp_path / "store")
    with pytest.raises(IntegrityError, match="add up to"):
        pull(ref, store=store, client=client(hostile))
    assert_nothing_stored(store)
    # a tensor renamed: the sizes add up, the names do not
    layers = [dict(layer) for layer in body["layers"]]
    last = layers[-1]
    layers[-1] = {**last, "annotations": {"vnd.graft.tensor.name": "not.a.tensor"}}
    ref = _republish(hostile, published, published["module"].canonical(), layers=layers)
    with pytest.raises(FormatError, match="tensor layers"):
        pull(ref, store=store, client=client(hostile))
    assert_nothing_stored(store)
    # a file layer pointing at other bytes than graft.json records
    layers = [dict(layer) for layer in body["layers"]]
    other = hostile.put_blob(b"not the labels")
    layers[0] = {**layers[0], "digest": other, "size": 14}
    ref = _republish(hostile, published, published["module"].canonical(), layers=layers)
    with pytest.raises(IntegrityError, match="is not the file"):
        pull(ref, store=store, client=client(hostile))
    assert_nothing_stored(store)


def test_a_non_canonical_config_is_a_module_digest_mismatch(hostile, published, tmp_path):
    pretty = json.dumps(published["module"].to_json(), indent=2).encode()
    ref = _republish(hostile, published, pretty)
    store = Store(tmp_path / "store")
    with pytest.raises(IntegrityError, match="not canonical"):
        pull(ref, store=store, client=client(hostile))
    assert_nothing_stored(store)


def test_a_manifest_other_than_the_pinned_digest_is_refused(hostile, published, tmp_path):
    wanted = "sha256:" + "ab" * 32
    hostile.behaviour.manifests[f"team/backbone:{wanted}"] = published["manifest"]
    store = Store(tmp_path / "store")
    with pytest.raises(IntegrityError, match="whose digest is"):
        pull(f"oci://{hostile.address}/team/backbone@{wanted}", store=store,
             client=client(hostile))
    assert_nothing_stored(store)


def test_credentials_never_follow_a_redirect_to_another_host(hostile, published, tmp_path):
    other = Hostile()  # the "CDN": another origin, serving the same blobs without auth
    try:
        other.behaviour.blobs = dict(hostile.behaviour.blobs)
        hostile.behaviour.redirect_blobs = other.url
        hostile.behaviour.token = "registry-token-123"
        hostile.behaviour.token_user = ("alice", "pw-alice")
        store = Store(tmp_path / "store")
        c = client(hostile, credentials=Credentials(username="alice", password="pw-alice"))
        stored = pull(f"oci://{hostile.address}/team/backbone:1.0.0", store=store, client=c)
        assert stored.digest == published["module"].digest
        assert other.requests("GET", "/blobs/")  # the blobs came from the other host
        for request in other.log:
            assert "authorization" not in request["headers"]
        # the registry itself got the token, obtained with the basic credentials
        manifests = hostile.requests("GET", "/manifests/")
        assert manifests[-1]["headers"]["authorization"] == "Bearer registry-token-123"
    finally:
        other.close()


def test_a_program_outside_the_operator_list_is_refused_while_tensors_download(
        hostile, saved, tmp_path):
    """The programs are checked as soon as they arrive (pull.py), not after the tensors."""
    import shutil

    from graft.errors import UnsafeContentError
    from graft.format.entries import FileEntry

    module = tmp_path / "module"
    shutil.copytree(saved.parent, module)
    manifest = Manifest.read(module)
    rel = sorted(r for r in manifest.files if r.startswith("programs/"))[0]
    program = json.loads((module / rel).read_bytes())
    program["nodes"][0]["target"] = "os.system"
    data = json.dumps(program).encode()
    (module / rel).write_bytes(data)
    files = dict(manifest.files)
    files[rel] = FileEntry(hashlib.sha256(data).hexdigest(), len(data))
    dataclasses.replace(manifest, files=files).write(module)
    hostile.serve_module(module, "team/hostile")
    store = Store(tmp_path / "store")
    with pytest.raises(UnsafeContentError, match="'os.system', which is not in Graft's "
                                                 "operator list") as info:
        pull(f"oci://{hostile.address}/team/hostile:1.0.0", store=store,
             client=client(hostile))
    # refused by the early check, before the store was handed anything
    frames = [entry.name for entry in info.traceback]
    assert "check_early" in frames and "add_blobs" not in frames
    assert_nothing_stored(store)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that no certificate authority signed, and its key."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def test_a_plain_http_registry_redirecting_to_https_gets_certificates_checked(
        hostile, published, tmp_path):
    cert, key = self_signed(tmp_path)
    cdn = Hostile(tls=(cert, key))
    try:
        cdn.behaviour.blobs = dict(hostile.behaviour.blobs)
        # the server is sound: a client that trusts its certificate reads from it
        trusting = httpx.HTTPTransport(verify=ssl.create_default_context(cafile=str(cert)))
        with RegistryClient(cdn.address, scheme="https", transport=trusting) as c:
            assert c.request("GET", "/v2/", scope="").status_code == 200
        hostile.behaviour.redirect_blobs = cdn.url
        store = Store(tmp_path / "store")
        with pytest.raises(RegistryError, match="CERTIFICATE_VERIFY_FAILED"):
            pull(f"oci://{hostile.address}/team/backbone:1.0.0", store=store,
                 client=client(hostile, retries=0))
        assert not cdn.requests("GET", "/blobs/")  # no request got past the handshake
        assert_nothing_stored(store)
    finally:
        cdn.close()


@pytest.mark.parametrize("status, error, words", [
    (401, RegistryAuthError, "graft login"),
    (403, RegistryAuthError, "denies"),
    (404, ModuleNotFound, "has nothing at"),
])
def test_refusals_are_one_clear_line(hostile, published, tmp_path, status, error, words):
    hostile.behaviour.statuses.append(("/manifests/", status, {}))
    store = Store(tmp_path / "store")
    with pytest.raises(error, match=words) as info:
        pull(f"oci://{hostile.address}/team/backbone:1.0.0", store=store,
             client=client(hostile, credentials=Credentials(username="u", password="p")))
    assert "\n" not in str(info.value)
    assert_nothing_stored(store)
    assert len(hostile.requests("GET", "/manifests/")) <= 2  # no retries of a refusal


def test_429_is_retried_honouring_retry_after(hostile, published, tmp_path):
    hostile.behaviour.statuses.append(("/manifests/", 429, {"Retry-After": "3"}))
    sleeps: list[float] = []
    c = client(hostile, sleeps)
    calls = {"n": 0}
    original = c._sleep

    def clear_after_two(seconds: float) -> None:
        original(seconds)
        calls["n"] += 1
        if calls["n"] == 2:
            hostile.behaviour.statuses.clear()  # the registry recovers

    c._sleep = clear_after_two
    store = Store(tmp_path / "store")
    stored = pull(f"oci://{hostile.address}/team/backbone:1.0.0", store=store, client=c)
    assert stored.digest == published["module"].digest
    assert sleeps == [3.0, 3.0]


def test_5xx_is_retried_with_backoff_then_refused(hostile, published, tmp_path):
    hostile.behaviour.statuses.append(("/manifests/", 503, {}))
    sleeps: list[float] = []
    store = Store(tmp_path / "store")
    with pytest.raises(RegistryError, match="answered 503 .* after 4 retries"):
        pull(f"oci://{hostile.address}/team/backbone:1.0.0", store=store,
             client=client(hostile, sleeps))
    assert sleeps == [0.01, 0.02, 0.04, 0.08]
    assert len(hostile.requests("GET", "/manifests/")) == 5
    assert_nothing_stored(store)


def test_a_retry_after_beyond_a_minute_is_not_waited_for(hostile, published, tmp_path):
    hostile.behaviour.statuses.append(("/manifests/", 429, {"Retry-After": "3600"}))
    sleeps: list[float] = []
    with pytest.raises(RegistryError, match="asks to wait 3600 s"):
        pull(f"oci://{hostile.address}/team/backbone:1.0.0", store=Store(tmp_path / "s"),
             client=client(hostile, sleeps))
    assert sleeps == []


def test_an_unreachable_registry_is_one_clear_line(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(RegistryError, match="cannot reach the registry"):
        pull(f"oci://{address}/team/x:1.0.0", store=Store(tmp_path / "s"),
             client=RegistryClient(address, retries=1, backoff=0.0))


def test_an_oversized_manifest_is_refused_while_reading(hostile, tmp_path):
    hostile.behaviour.manifests["team/big:1.0.0"] = b"{" + b" " * (5 << 20) + b"}"
    with pytest.raises(FormatError, match="over"):
        pull(f"oci://{hostile.address}/team/big:1.0.0", store=Store(tmp_path / "s"),
             client=client(hostile))


def test_a_manifest_of_another_artifact_type_is_refused(hostile, published, tmp_path):
    body = json.loads(published["manifest"])
    body["artifactType"] = "application/vnd.example.other"
    hostile.put_manifest("team/other", "1", canonical_json(body))
    with pytest.raises(FormatError, match="not a Graft module"):
        pull(f"oci://{hostile.address}/team/other:1", store=Store(tmp_path / "s"),
             client=client(hostile))


def test_the_artifact_rebuilds_every_safetensors_file_byte_for_byte(module_dirs):
    import numpy as np
    from safetensors.numpy import save

    from graft.hub.oci.artifact import parse_manifest

    reference = save({"input.x": np.arange(12, dtype=np.float32),
                      "output.y": np.ones(3, np.float64)})
    directory, manifest = module_dirs(extra={"reference/forward.safetensors": reference,
                                             "assets/not.safetensors": b"not a tensor file"})
    data, plan, sources = build_manifest(manifest, directory)
    assert parse_manifest(data, "m") == plan
    for rel, split in plan.tensor_files.items():
        original = (directory / rel).read_bytes()
        blobs = [split.header, *(d for _, d in split.tensors)]
        rebuilt = b"".join(original[sources[d.digest][1]:sources[d.digest][2]] for d in blobs)
        assert rebuilt == original
        assert hashlib.sha256(rebuilt).hexdigest() == manifest.files[rel].sha256
    for name, d in plan.tensors:
        assert d.hex == manifest.tensors[name].sha256
    assert {n for n, _ in plan.tensors} >= {"empty", "bn.running_mean", "bn2.running_mean"}
    assert set(plan.tensor_files) == {"weights.safetensors", "reference/forward.safetensors"}
    assert "assets/not.safetensors" in plan.files  # not splittable: sent whole
    assert plan.config.digest == manifest.digest


def test_graft_token_is_the_bearer_token(hostile, published, tmp_path, monkeypatch):
    hostile.behaviour.token = "env-token-42"
    monkeypatch.setenv("GRAFT_TOKEN", "env-token-42")
    stored = pull(f"oci://{hostile.address}/team/backbone:1.0.0", store=Store(tmp_path / "s"),
                  client=RegistryClient(hostile.address))
    assert stored.digest == published["module"].digest
    assert not hostile.requests("GET", "/token")  # used as is, no exchange
    monkeypatch.setenv("GRAFT_TOKEN", "wrong")
    with pytest.raises(RegistryAuthError, match="refused the credentials") as info:
        pull(f"oci://{hostile.address}/team/backbone:1.0.0", store=Store(tmp_path / "t"),
             client=RegistryClient(hostile.address))
    assert "wrong" not in str(info.value)
