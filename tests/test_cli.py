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


@pytest.mark.parametrize("args, message, code", [
    (("inspect", "no-such-module"), "no-such-module", 1),
    (("verify", "./does/not/exist"), "not a module", 1),
    (("run", "Bad Name!", "x.png"), "handle", 1),
    (("import", "resnet-9000"), "zoo has no module", 1),
    (("rm",), "the following arguments are required: handle", 2),
    (("bogus",), "invalid choice: 'bogus'", 2),
    (("run", "tiny", "x.png", "--top", "many"), "invalid int value: 'many'", 2),
])
def test_errors_are_one_line_without_traceback(args, message, code):
    out = graft_cli(*args)
    assert out.returncode == code
    assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_a_store_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.write_text("I am a file")
    monkeypatch.setenv("GRAFT_HOME", str(home))
    for command in (("list",), ("gc",), ("inspect", "tiny"), ("rm", "tiny@1")):
        out = graft_cli(*command)
        assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
        assert "is a file, not a directory" in out.stderr and "GRAFT_HOME" in out.stderr


@pytest.mark.parametrize("raised, code, words", [
    (RuntimeError("boom\nsecond line"), 1, "unexpected RuntimeError: boom; this is a bug"),
    (KeyError("k"), 1, "unexpected KeyError: 'k'"),
    (PermissionError(13, "Permission denied"), 1, "error: [Errno 13] Permission denied"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_unexpected_errors_are_one_line(monkeypatch, capsys, raised, code, words):
    import graft.cli

    def fail(args):
        raise raised

    monkeypatch.setattr(graft.cli, "cmd_list", fail)
    assert graft.cli.main(["list"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err, err


# Text a terminal would act on: clear the screen, recolour, return the cursor, reorder.
EVIL = "\x1b[2J\x1b[31mred\x1b[0m\r\u202eevil"
FORGED = "sha256:" + "0" * 64


@pytest.fixture
def hostile_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "hostile"
    graft.save(TinyCNN(), path, name="hostile", version="1.0.0",
               description=f"fine\n  digest       {FORGED}\n{EVIL}",
               license=f"MIT\nparents\n    other@1.0.0  {FORGED}",
               signatures={"classify": graft.Signature(
                   inputs={"images": "float32[batch,3,16,16]"},
                   preprocess=graft.ImagePreprocess(size=16, resize=16, mean=(0.5,) * 3,
                                                    std=(0.5,) * 3))},
               # (a label is one line: \r would split it, so it is left out there)
               assets={"labels.txt": f"ant{EVIL.replace(chr(13), '')}\nbee\x1b]0;title\x07\n"
                                     "cat\x9b1m\ndog\n"})
    return path


def assert_inert(text: str) -> None:
    """Nothing in ``text`` that a terminal would act on: only printable characters."""
    for line in text.splitlines():
        assert line.isprintable() and "\u202e" not in line, repr(line)


def test_module_text_is_escaped_in_list_inspect_and_run(hostile_dir, tmp_path):
    assert graft_cli("add", str(hostile_dir)).returncode == 0
    digest = graft.load(hostile_dir).digest
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    for args in (("list",), ("inspect", "hostile"), ("inspect", str(hostile_dir)),
                 ("run", "hostile", str(image), "--top", "4")):
        out = graft_cli(*args)
        assert out.returncode == 0, out.stderr
        assert_inert(out.stdout)
        if args[0] == "inspect":
            digest_lines = [line for line in out.stdout.splitlines()
                            if line.lstrip().startswith("digest")]
            assert digest_lines == [f"  digest       {digest}"]  # the forged one is not a line
            assert "\\x1b[2J" in out.stdout and "\\u202eevil" in out.stdout
            assert not [line for line in out.stdout.splitlines() if line.startswith("  parents")]
        if args[0] == "run":
            labels = sorted(line.split(None, 1)[1] for line in out.stdout.splitlines()[1:])
            assert labels == sorted(["ant\\x1b[2J\\x1b[31mred\\x1b[0m\\u202eevil",
                                     "bee\\x1b]0;title\\x07", "cat\\x9b1m", "dog"])


_IMPORTS = """
import atexit, sys
atexit.register(lambda: print("TORCH" if "torch" in sys.modules else "NO-TORCH",
                              file=sys.stderr))
import graft.cli
sys.exit(graft.cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("args", [("--help",), ("list",), ("inspect", "tiny-cnn"),
                                  ("inspect", "MODULE_DIR"), ("list", "--help")])
def test_list_inspect_and_help_import_no_torch(module_dir, args):
    assert graft_cli("add", str(module_dir)).returncode == 0
    args = tuple(str(module_dir) if a == "MODULE_DIR" else a for a in args)
    out = subprocess.run([sys.executable, "-c", _IMPORTS, *args], capture_output=True,
                         text=True, env=env_with_src(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "NO-TORCH"


def test_list_shows_a_damaged_module_and_the_rest(module_dir, tmp_path, graft_home):
    assert graft_cli("add", str(module_dir)).returncode == 0
    other = tmp_path / "other"
    torch.manual_seed(1)
    graft.save(TinyCNN(), other, name="other", version="2.0.0",
               example_inputs=(torch.randn(2, 3, 16, 16),))
    assert graft_cli("add", str(other)).returncode == 0
    stored = graft.Store().resolve("other")
    (stored.path / ".weights-header").unlink()  # the store keeps the weights as tensor blobs
    out = graft_cli("list")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split()[-1] for line in out.stdout.splitlines()[2:4]}
    assert rows == {"other": "damaged", "tiny-cnn": "ok"}
    assert "other@2.0.0 is damaged: " in out.stdout and "header of its weights" in out.stdout


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
