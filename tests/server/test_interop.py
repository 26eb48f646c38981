"""Round trips through `graft serve` with real clients: the Graft client (push, pull into an
empty store in another process, graft verify, identical outputs) and skopeo."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import graft
from tests.conftest import env_with_src
from tests.server.conftest import module_blobs, sha

_OUTPUTS = """
import sys, torch, graft
torch.manual_seed(123)
module = graft.load(sys.argv[1])
print(module.digest)
x = torch.randn(2, 3, 16, 16)
with torch.no_grad():
    print(repr(module(x).flatten().tolist()))
"""


def _graft(*args: str, home, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**env_with_src(), "GRAFT_HOME": str(home)}
    env.pop("GRAFT_TOKEN", None)
    if token:
        env["GRAFT_TOKEN"] = token
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_graft_push_pull_verify_in_another_process_identical_outputs(server, modules, tmp_path):
    token = server.token("vision")
    pusher = tmp_path / "pusher-home"
    for directory, repo in ((modules["parent"], "vision/tiny-cnn"),
                            (modules["child"], "vision/tiny-pets")):
        out = _graft("-m", "graft.cli", "push", str(directory), f"oci://{server.host}/{repo}",
                     home=pusher, token=token)
        assert out.returncode == 0, out.stderr
    # Pulling needs no token (public namespace); the puller's store starts empty.
    puller = tmp_path / "puller-home"
    ref = f"oci://{server.host}/vision/tiny-pets:1.0.0"
    out = _graft("-m", "graft.cli", "pull", ref, home=puller)
    assert out.returncode == 0, out.stderr
    out = _graft("-m", "graft.cli", "verify", "tiny-pets@1.0.0", home=puller)
    assert out.returncode == 0 and out.stdout.startswith("ok:"), out.stderr
    remote = _graft("-c", _OUTPUTS, ref, home=puller)
    local = _graft("-c", _OUTPUTS, str(modules["child"]), home=tmp_path / "local-home")
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout  # same digest, bit-identical outputs
    assert remote.stdout.splitlines()[0] == graft.load(modules["child"]).digest
    # The server saw the child as a Graft module: indexed with its parent.
    with server.client() as c:
        detail = c.get("/api/v1/modules/vision/tiny-pets").json()
        assert detail["parents"][0]["repo"] == "vision/tiny-cnn"
        parent = c.get("/api/v1/modules/vision/tiny-cnn").json()
        assert parent["children"] == [{"repo": "vision/tiny-pets", "version": "1.0.0",
                                       "name": "tiny-pets"}]


def test_skopeo_copies_a_module_out_and_back_in_with_digests_intact(server, modules, tmp_path):
    token = server.token("vision")
    data, blobs = module_blobs(modules["parent"])
    layout = tmp_path / "layout"
    from tests.server.test_auth import _write_layout

    _write_layout(layout, modules["parent"])
    push = subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", "--dest-creds",
                           f"u:{token}", f"oci:{layout}:1.0.0",
                           f"docker://{server.host}/vision/tiny-cnn:1.0.0"],
                          capture_output=True, text=True, timeout=120)
    assert push.returncode == 0, push.stderr
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{server.host}/vision/tiny-cnn:1.0.0"],
                         capture_output=True, timeout=60)
    assert raw.returncode == 0 and raw.stdout == data
    out_layout = tmp_path / "copied"
    pull = subprocess.run(["skopeo", "copy", "--src-tls-verify=false",
                           f"docker://{server.host}/vision/tiny-cnn:1.0.0",
                           f"oci:{out_layout}:1.0.0"], capture_output=True, text=True,
                          timeout=120)
    assert pull.returncode == 0, pull.stderr
    index = json.loads((out_layout / "index.json").read_text())
    assert index["manifests"][0]["digest"] == sha(data)
    for digest, blob in blobs.items():
        assert (out_layout / "blobs" / "sha256" / digest[7:]).read_bytes() == blob
    # The module skopeo pushed is a checked, indexed Graft module, and loads from the server.
    with server.client() as c:
        assert c.get("/api/v1/modules/vision/tiny-cnn").json()["version"] == "1.0.0"
    module = _graft("-c", _OUTPUTS, f"oci://{server.host}/vision/tiny-cnn:1.0.0",
                    home=tmp_path / "home")
    assert module.returncode == 0, module.stderr
    torch.manual_seed(123)
    expected = graft.load(modules["parent"])(torch.randn(2, 3, 16, 16)).flatten().tolist()
    assert module.stdout.splitlines()[1] == repr(expected)
