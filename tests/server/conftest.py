"""Fixtures for the server tests: the real `graft serve` in a subprocess on 127.0.0.1, real
tiny modules (graft.save), and a small independent OCI pusher over httpx."""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import torch

import graft
from graft.format.entries import Parent
from graft.format.manifest import Manifest
from graft.hub.oci import artifact
from tests.conftest import TinyCNN, env_with_src

_READY_ATTEMPTS = 300  # x 0.05 s: bounded wait for the port to accept connections


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running `graft serve` subprocess."""

    root: Path
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60.0)

    def token(self, namespace: str, scope: str = "push", private: bool = False) -> str:
        args = ["serve", "token", "create", "--root", str(self.root), "--namespace", namespace,
                "--scope", scope, *(["--private"] if private else [])]
        out = subprocess.run([sys.executable, "-m", "graft.cli", *args], capture_output=True,
                             text=True, env=env_with_src(), timeout=60, check=True)
        return out.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(root: Path, *args: str, env: dict[str, str] | None = None,
                 port: int | None = None) -> Server:
    port = port or free_port()
    log = root.parent / f"{root.name}-serve-{port}-{time.monotonic_ns()}.log"
    full_env = {**env_with_src(), **(env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "graft.cli", "serve", "--root", str(root),
                                 "--port", str(port), *args], stdout=out, stderr=subprocess.STDOUT,
                                env=full_env)
    server = Server(root, port, proc, log, args, env or {})
    for _ in range(_READY_ATTEMPTS):
        if proc.poll() is not None:
            raise RuntimeError(f"graft serve exited with {proc.returncode}:\n{server.logs()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"graft serve did not listen on {port}:\n{server.logs()}")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """Start servers (``serve(*args, env=...)``); all are stopped at the end of the test."""
    started: list[Server] = []

    def start(*args: str, env: dict[str, str] | None = None, root: Path | None = None,
              port: int | None = None) -> Server:
        server = start_server(root or tmp_path / "registry", *args, env=env, port=port)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(serve: Any) -> Server:
    return serve()


# -- modules ---------------------------------------------------------------------------------

CARD = """# Tiny CNN

A **tiny** convolutional network for the tests.

| layer | channels |
|-------|----------|
| conv1 | 8        |
"""


def save_tiny(path: Path, *, name: str = "tiny-cnn", version: str = "1.0.0", seed: int = 0,
              parents: tuple[Parent, ...] = (), card: str = CARD, description: str = "a tiny CNN",
              base: TinyCNN | None = None) -> Path:
    torch.manual_seed(seed)
    model = base if base is not None else TinyCNN()
    model.eval()
    graft.save(model, path, name=name, version=version, description=description,
               example_inputs=(torch.randn(2, 3, 16, 16),),
               inputs={"images": "float32[batch,3,16,16]"}, parents=parents,
               model_card=card, variants=("eval",))
    return path


@pytest.fixture(scope="session")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A parent module and a head-only child of it (every other tensor shared)."""
    root = tmp_path_factory.mktemp("server-modules")
    torch.manual_seed(0)
    base = TinyCNN()
    parent = save_tiny(root / "parent", base=base)
    digest = Manifest.read(parent).digest
    with torch.no_grad():
        base.head.weight.add_(0.5)
    child = save_tiny(root / "child", name="tiny-pets", version="1.0.0", base=base,
                      parents=(Parent("oci://registry/vision/tiny-cnn:1.0.0", digest),),
                      description="tiny CNN fine-tuned on pets", card="# Pets\n\nA child.")
    return {"parent": parent, "child": child}


# -- an independent OCI pusher ---------------------------------------------------------------


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_blob(client: httpx.Client, repo: str, data: bytes) -> httpx.Response:
    """Monolithic upload (POST ?digest=)."""
    return client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha(data)}, content=data,
                       headers={"Content-Type": "application/octet-stream"})


def module_blobs(directory: Path) -> tuple[bytes, dict[str, bytes]]:
    """The OCI manifest bytes of a module directory and every blob it names."""
    module = Manifest.read(directory)
    data, plan, sources = artifact.build_manifest(module, directory)
    blobs = {plan.config.digest: module.canonical()}
    for digest, (path, start, end) in sources.items():
        with open(path, "rb") as f:
            f.seek(start)
            blobs[digest] = f.read(end - start)
    return data, blobs


def push_module(client: httpx.Client, repo: str, directory: Path, tag: str = "1.0.0",
                manifest: bytes | None = None) -> httpx.Response:
    data, blobs = module_blobs(directory)
    for digest, blob in blobs.items():
        response = push_blob(client, repo, blob)
        assert response.status_code == 201, response.text
    return client.put(f"/v2/{repo}/manifests/{tag}", content=manifest or data,
                      headers={"Content-Type": artifact.MANIFEST_TYPE})
