"""The graft command: each subcommand on a real store, errors as one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import graft
from tests.conftest import TinyCNN, env_with_src


def graft_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "graft.cli", *args], capture_output=True,
                          text=True, env=env_with_src(), timeout=120)


@pytest.fixture
def module_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "tiny"
    graft.save(TinyCNN(), path, name="tiny-cnn", version="1.0.0", description="a tiny CNN",
               signatures={"classify": graft.Signature(
                   inputs={"images": "float32[batch,3,16,16]"},
                   preprocess=graft.ImagePreprocess(size=16, resize=16, mean=(0.5,) * 3,
                                                    std=(0.5,) * 3))},
               assets={"labels.txt": "ant\nbee\ncat\ndog\n"})
    return path


def test_add_list_inspect_verify_run_rm_gc(module_dir, tmp_path, graft_home):
    out = graft_cli("add", str(module_dir))
    assert out.returncode == 0, out.stderr
    digest = graft.load(module_dir).digest
    assert digest in out.stdout

    out = graft_cli("list")
    assert "tiny-cnn" in out.stdout and "1.0.0" in out.stdout

    out = graft_cli("inspect", "tiny-cnn")
    assert digest in out.stdout and "images: float32[batch,3,16,16]" in out.stdout
    assert "classify *" in out.stdout and "eval/train" in out.stdout

    out = graft_cli("verify", "tiny-cnn@1.0.0")
    assert out.returncode == 0 and out.stdout.startswith("ok:"), out.stderr

    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), np.uint8)).save(image)
    out = graft_cli("run", f"tiny-cnn@{digest}", str(image), "--top", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == str(image) and len(lines) == 3
    assert all(line.split()[1] in {"ant", "bee", "cat", "dog"} for line in lines[1:])

    out = graft_cli("rm", "tiny-cnn@1.0.0")
    assert out.returncode == 0 and graft_cli("list").stdout.startswith("the store is empty")
    out = graft_cli("gc")
    assert out.returncode == 0 and "removed" in out.stdout
    assert not [p for p in (graft_home / "blobs").rglob("*") if p.is_file()]


@pytest.mark.parametrize("args, message", [
    (("inspect", "no-such-module"), "no-such-module"),
    (("verify", "./does/not/exist"), "not a module"),
    (("run", "Bad Name!", "x.png"), "handle"),
    (("import", "resnet-9000"), "zoo has no module"),
])
def test_errors_are_one_line_without_traceback(args, message):
    out = graft_cli(*args)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and message in out.stderr
    assert "Traceback" not in out.stderr


def test_verify_detects_tampering(module_dir):
    weights = module_dir / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    out = graft_cli("verify", str(module_dir))
    assert out.returncode == 1 and "sha256" in out.stderr


@pytest.mark.parametrize("command", ["list", "inspect", "verify", "run", "add", "rm", "gc",
                                     "import", "finetune", "launch"])
def test_every_command_has_help(command):
    out = graft_cli(command, "--help")
    assert out.returncode == 0 and "usage: graft" in out.stdout
