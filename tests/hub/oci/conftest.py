"""Fixtures for the registry tests: the real CNCF distribution registry (Debian's
``docker-registry``) on 127.0.0.1, with and without htpasswd auth, and module directories with
real safetensors weights built without torch.export (seconds, not minutes)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import pytest

from graft.format.entries import FileEntry, Parent, TensorEntry
from graft.format.manifest import Manifest
from graft.format.spec import SignatureSpec
from graft.hub.store import Store
from tests.hub.oci.hostile import free_port

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
SKOPEO = shutil.which("skopeo")

needs_registry = pytest.mark.skipif(not Path(REGISTRY_BIN).exists(),
                                    reason="docker-registry is not installed (.ci/system-packages)")


@dataclass
class Registry:
    """A running distribution registry."""

    address: str  # 127.0.0.1:PORT
    storage: Path
    process: subprocess.Popen
    username: str | None = None
    password: str | None = None

    def ref(self, path: str) -> str:
        return f"oci://{self.address}/{path}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def start_registry(root: Path, *, auth: tuple[str, str] | None = None,
                   token: object = None) -> Registry:
    """Start ``docker-registry serve`` on a free loopback port; wait until /v2/ answers.

    Args:
        auth: ``(user, password)`` for htpasswd basic auth.
        token: A ``tests.hub.oci.tokens.TokenService`` for ``auth: token`` (bearer tokens).
    """
    import httpx

    root.mkdir(parents=True, exist_ok=True)
    storage = root / "storage"
    port = free_port()
    auth_block = ""
    if auth is not None:
        import bcrypt

        hashed = bcrypt.hashpw(auth[1].encode(), bcrypt.gensalt(rounds=4)).decode()
        (root / "htpasswd").write_text(f"{auth[0]}:{hashed}\n")
        auth_block = (f"auth:\n  htpasswd:\n    realm: graft-test\n"
                      f"    path: {root / 'htpasswd'}\n")
    if token is not None:
        from tests.hub.oci.tokens import ISSUER, SERVICE

        auth_block = (f"auth:\n  token:\n    realm: {token.realm}\n    service: {SERVICE}\n"
                      f"    issuer: {ISSUER}\n    rootcertbundle: {token.cert}\n")
    (root / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n{auth_block}")
    log = open(root / "registry.log", "wb")
    process = subprocess.Popen([REGISTRY_BIN, "serve", str(root / "config.yml")], stdout=log,
                               stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    for _ in range(600):  # bounded: the registry binds within a second or two
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {(root / 'registry.log').read_text()}")
        try:
            httpx.get(f"http://{address}/v2/", timeout=1.0)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    else:
        process.kill()
        raise RuntimeError("docker-registry did not start")
    return Registry(address, storage, process, *(auth or (None, None)))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """An anonymous registry shared by one test file."""
    if not Path(REGISTRY_BIN).exists():
        pytest.skip("docker-registry is not installed (.ci/system-packages)")
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry behind htpasswd basic auth (user 'graft', password 's3cret-pw')."""
    if not Path(REGISTRY_BIN).exists():
        pytest.skip("docker-registry is not installed (.ci/system-packages)")
    pytest.importorskip("bcrypt")
    reg = start_registry(tmp_path_factory.mktemp("auth-registry"), auth=("graft", "s3cret-pw"))
    yield reg
    reg.stop()


def write_weighted_module(directory: Path, name: str, version: str,
                          tensors: Mapping[str, np.ndarray], *,
                          parents: tuple[Parent, ...] = (),
                          extra: Mapping[str, bytes] | None = None) -> Manifest:
    """A module directory with a real ``weights.safetensors`` and the tensor digests the
    manifest records (the store and the registry code never run its program)."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              str(directory / "weights.safetensors"))
    contents = {"programs/forward.eval.json": b'{"graph": "' + name.encode() + b'"}',
                "assets/labels.txt": b"a\nb\n", **(extra or {})}
    for rel, data in contents.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)
    files = {}
    for rel in [*contents, "weights.safetensors"]:
        data = (directory / rel).read_bytes()
        files[rel] = FileEntry(hashlib.sha256(data).hexdigest(), len(data))
    entries = {k: TensorEntry("parameter", str(v.dtype), tuple(v.shape),
                              hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest())
               for k, v in tensors.items()}
    signature = SignatureSpec(inputs={"x": "float32[batch,4]"},
                              outputs={"y": "float32[batch,2]"},
                              programs={"eval": "programs/forward.eval.json"})
    manifest = Manifest(name=name, version=version, signatures={"forward": signature},
                        default_signature="forward", files=files, tensors=entries,
                        parents=parents)
    manifest.write(directory)
    return manifest


def backbone_tensors(seed: int = 0, big: int = 300_000) -> dict[str, np.ndarray]:
    """A backbone's worth of tensors: one large (chunked upload), several small, a repeat
    and an empty one."""
    rng = np.random.default_rng(seed)
    return {
        "body.weight": rng.standard_normal(big, dtype=np.float32),
        "body.bias": rng.standard_normal(64, dtype=np.float32),
        "bn.running_mean": np.zeros(16, np.float32),
        "bn.running_var": np.ones(16, np.float32),
        "bn2.running_mean": np.zeros(16, np.float32),  # same bytes as bn.running_mean
        "steps": np.zeros(1, np.int64),
        "empty": np.zeros(0, np.float32),
        "head.weight": rng.standard_normal((2, 64), dtype=np.float32),
    }


@pytest.fixture
def module_dirs(tmp_path: Path) -> Callable[..., tuple[Path, Manifest]]:
    """``make(name, version, tensors=..., parents=...)`` -> (directory, manifest)."""
    counter = iter(range(1 << 30))

    def make(name: str = "backbone", version: str = "1.0.0", *,
             tensors: Mapping[str, np.ndarray] | None = None,
             parents: tuple[Parent, ...] = (),
             extra: Mapping[str, bytes] | None = None) -> tuple[Path, Manifest]:
        directory = tmp_path / "modules" / f"{name}-{version}-{next(counter)}"
        manifest = write_weighted_module(directory, name, version,
                                         tensors if tensors is not None else backbone_tensors(),
                                         parents=parents, extra=extra)
        return directory, manifest

    return make


def child_tensors(parent: Mapping[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
    """The parent's tensors with a new head: what a head-only fine-tune changes."""
    rng = np.random.default_rng(seed)
    out = dict(parent)
    out["head.weight"] = rng.standard_normal((3, 64), dtype=np.float32)
    out["head.bias"] = rng.standard_normal(3, dtype=np.float32)
    return out


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, object]]:
    """A registry behind the Docker/OCI token flow (``auth: token``), and its token service
    (user 'graft', password 'tok3n-pw')."""
    if not Path(REGISTRY_BIN).exists() or shutil.which("openssl") is None:
        pytest.skip("docker-registry or openssl is not installed")
    from tests.hub.oci.tokens import TokenService

    root = tmp_path_factory.mktemp("token-registry")
    service = TokenService(root / "tokens", {"graft": "tok3n-pw"})
    reg = start_registry(root, token=service)
    yield reg, service
    reg.stop()
    service.close()


@dataclass(frozen=True)
class Saved:
    """Real modules written by graft.save: a parent and a head-only child of it."""

    parent: Path
    parent_manifest: Manifest
    child: Path
    child_manifest: Manifest


@pytest.fixture
def local(tmp_path, saved):
    """A store holding ``saved``'s parent and child."""
    store = Store(tmp_path / "local")
    store.add(saved.parent)
    store.add(saved.child)
    return store


@pytest.fixture(scope="session")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """``net@1.0.0`` (1.1 MB of weights, two batch norms) and ``net-pets@1.0.0``, the same
    backbone with a new 3-class head, saved once per session."""
    import torch
    from torch import nn

    import graft

    class Net(nn.Module):
        def __init__(self, classes: int) -> None:
            super().__init__()
            self.body = nn.Linear(8, 256)
            self.bn1 = nn.BatchNorm1d(256)
            self.big = nn.Linear(256, 1024)
            self.bn2 = nn.BatchNorm1d(1024)
            self.head = nn.Linear(1024, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn1(self.body(x)))  # (B, 256)
            return self.head(torch.relu(self.bn2(self.big(x))))  # (B, classes)

    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    parent = Net(2).eval()
    example = (torch.randn(2, 8),)
    p = graft.save(parent, root / "net", name="net", version="1.0.0", example_inputs=example)
    child = Net(3).eval()
    state = {k: v for k, v in parent.state_dict().items() if not k.startswith("head.")}
    child.load_state_dict(state, strict=False)
    c = graft.save(child, root / "net-pets", name="net-pets", version="1.0.0",
                   example_inputs=example, parents=[("net@1.0.0", p.digest)])
    return Saved(Path(p.path), Manifest.read(Path(p.path)), Path(c.path),
                 Manifest.read(Path(c.path)))
