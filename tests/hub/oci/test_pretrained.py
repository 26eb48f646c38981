"""EfficientNet-Lite0 and a head-only child through the real registry, and skopeo on them."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from graft.hub.oci import push
from graft.hub.store import Store
from tests.conftest import env_with_src
from tests.hub.oci.conftest import SKOPEO

pytestmark = pytest.mark.pretrained


def save_head_only_child(store: Store, parent_handle: str) -> object:
    """``pets@1.0.0``: EfficientNet-Lite0's backbone with a new 3-class head, as a
    head-only fine-tune exports it (296 of its 298 tensors are the parent's)."""
    import torch

    import graft
    from graft.zoo import efficientnet

    parent = store.resolve(parent_handle)
    model = efficientnet.load_pretrained().eval()
    torch.manual_seed(0)
    model._fc = torch.nn.Linear(model._fc.in_features, 3)
    images = {"images": "float32[batch,3,224,224]"}
    example = (torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)
    return graft.save(model, "pets@1.0.0", store=store, parents=[(parent.handle, parent.digest)],
                      signatures={"classify": graft.Signature("classify", inputs=images,
                                                              outputs=["logits"],
                                                              example_inputs=example)})


def test_efficientnet_and_its_child_round_trip(registry, tmp_path):
    import torch

    import graft
    from graft.zoo import import_module

    local = Store(tmp_path / "local")
    import_module("efficientnet-lite0", store=local)
    parent = local.resolve("efficientnet-lite0")
    save_head_only_child(local, parent.handle)
    pushed_parent = push(parent.handle, registry.ref("zoo/efficientnet-lite0"), store=local)
    pushed_child = push("pets@1.0.0", registry.ref("team/pets"), store=local)
    weights = parent.manifest().files["weights.safetensors"].size
    assert pushed_child.bytes_sent <= 0.05 * weights, (pushed_child.bytes_sent, weights)

    home = tmp_path / "other-machine"
    env = {**env_with_src(), "GRAFT_HOME": str(home)}
    for ref in (pushed_parent.reference, pushed_child.reference):
        out = subprocess.run([sys.executable, "-m", "graft.cli", "pull", ref], env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
    for handle in (parent.handle, "pets@1.0.0"):
        out = subprocess.run([sys.executable, "-m", "graft.cli", "verify", handle], env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0 and out.stdout.startswith("ok:"), out.stderr
    pulled = Store(home)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        for handle in (parent.handle, "pets@1.0.0"):
            a = graft.load(handle, store=local).signature("classify")(x)
            b = graft.load(handle, store=pulled).signature("classify")(x)
            torch.testing.assert_close(b, a, rtol=0, atol=0)

    if SKOPEO is not None:
        raw = subprocess.run([SKOPEO, "inspect", "--raw", "--tls-verify=false",
                              f"docker://{registry.address}/zoo/efficientnet-lite0:"
                              f"{parent.version}"], capture_output=True, timeout=120,
                             check=True).stdout
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == pushed_parent.manifest_digest
        assert json.loads(raw)["config"]["digest"] == parent.digest
