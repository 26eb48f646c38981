"""`graft rm` and `gc` while another process has the module loaded, is loading it, or calls it
(graft.hub.leases): the loaded module keeps working, or the load fails with a Graft error.

The other process is real, and it is stopped at named points (a line it waits for on stdin,
or ``GRAFT_TEST_PAUSE_AT``, which makes it SIGSTOP itself), never raced against a sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graft
from graft.errors import ModuleNotFound
from graft.hub.store import Store
from tests.conftest import TinyCNN, env_with_src
from tests.hub.test_store import assert_no_leftovers

_USER = """
import sys, torch, graft
from graft.errors import GraftError
torch.manual_seed(1)
x = torch.randn(2, 3, 16, 16)
try:
    module = graft.load("tiny-cnn", trainable=True)
except GraftError as exc:
    print("load failed", type(exc).__name__, exc, flush=True)
    sys.exit(0)
print("loaded", flush=True)
sys.stdin.readline()  # stop point: the test removes the module now
module.eval()
with torch.no_grad():
    y = module(x)  # the first call reads the eval program from the (removed) tree
module.train()
module(x).sum().backward()  # and this one the train program
print("called", " ".join(f"{v:.6f}" for v in y.flatten().tolist()), flush=True)
"""


@pytest.fixture
def stored(graft_home: Path) -> Store:
    torch.manual_seed(0)
    graft.save(TinyCNN(), "tiny-cnn@1.0.0", example_inputs=(torch.randn(2, 3, 16, 16),))
    return Store(graft_home)


def start_user(pause_at: str | None = None) -> subprocess.Popen[str]:
    env = env_with_src()
    if pause_at:
        env["GRAFT_TEST_PAUSE_AT"] = pause_at
    return subprocess.Popen([sys.executable, "-c", _USER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_until_stopped(proc: subprocess.Popen[str]) -> None:
    """Block until the child has SIGSTOPped itself at its pause point."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the child ended instead (status {status})"


def finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate("go\n", timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err
    return out


def expected_output() -> str:
    module = graft.load("tiny-cnn").eval()
    torch.manual_seed(1)
    with torch.no_grad():
        y = module(torch.randn(2, 3, 16, 16))
    return "called " + " ".join(f"{v:.6f}" for v in y.flatten().tolist())


@pytest.mark.parametrize("then_gc", [False, True], ids=["rm", "rm+gc"])
def test_a_loaded_module_keeps_working_after_rm(stored: Store, then_gc: bool) -> None:
    want = expected_output()
    tree = stored.resolve("tiny-cnn").path
    user = start_user()
    try:
        assert user.stdout.readline().strip() == "loaded"
        if then_gc:
            stored.remove("tiny-cnn@1.0.0")
        else:  # through the command, which says why the files stay
            out = subprocess.run([sys.executable, "-m", "graft.cli", "rm", "tiny-cnn@1.0.0"],
                                 capture_output=True, text=True, env=env_with_src(), timeout=60)
            assert out.returncode == 0 and "a running process has it loaded" in out.stdout
        with pytest.raises(ModuleNotFound):  # gone for everyone else at once
            stored.resolve("tiny-cnn")
        if then_gc:
            report = stored.gc()
            assert (report.trees_removed, report.trees_kept, report.trees_adopted) == (0, 1, 0)
        assert tree.exists()  # held by the user's lease
    finally:
        out = finish(user)
    assert out.splitlines()[-1] == want
    report = stored.gc()  # the user is gone: its tree and blobs go now
    assert report.trees_removed == 1 and not tree.exists()
    assert_no_leftovers(stored)


def test_rm_and_gc_during_a_load_after_the_lease(stored: Store) -> None:
    want = expected_output()
    user = start_user(pause_at="store.opened")  # checked and leased, weights not yet read
    try:
        wait_until_stopped(user)
        stored.remove("tiny-cnn@1.0.0")
        assert stored.gc().trees_kept == 1
    finally:
        user.send_signal(signal.SIGCONT)
    out = finish(user)
    assert out.splitlines()[-1] == want
    assert stored.gc().trees_removed == 1
    assert_no_leftovers(stored)


def test_rm_and_gc_during_a_load_before_the_lease(stored: Store) -> None:
    user = start_user(pause_at="store.found")  # the row was read; no lease, no check yet
    try:
        wait_until_stopped(user)
        stored.remove("tiny-cnn@1.0.0")
        stored.gc()
        assert not (stored.root / "modules").exists() or not list(
            (stored.root / "modules").iterdir())
    finally:
        user.send_signal(signal.SIGCONT)
    out = finish(user)
    assert out.startswith("load failed ModuleNotFound") and "removed from the local store" \
        in out, out
    stored.gc()
    assert_no_leftovers(stored)


def test_a_same_size_edit_of_the_weights_is_caught_by_graft_load(stored: Store) -> None:
    tensors = stored.resolve("tiny-cnn").manifest().tensors
    name = max(tensors, key=lambda n: len(stored.blob_path(tensors[n].sha256).read_bytes()))
    path = stored.blob_path(tensors[name].sha256)  # the tensor's own blob
    graft.load("tiny-cnn")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # inside the tensor's bytes: a silently different model
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(graft.IntegrityError, match=f"tensor {name} does not match its sha256"):
        graft.load("tiny-cnn")


def test_a_copied_module_holds_a_lease_of_its_own(stored: Store) -> None:
    import copy
    import gc

    unraisable: list[BaseException | None] = []
    hook = sys.unraisablehook
    sys.unraisablehook = lambda info: unraisable.append(info.exc_value)
    try:
        want = expected_output()
        tree = stored.resolve("tiny-cnn").path
        module = graft.load("tiny-cnn").eval()
        twin = copy.deepcopy(module)  # as EMA or best-model keeping do
        assert twin._store_lease._fd != module._store_lease._fd
        del module
        gc.collect()  # the original closes its descriptor, and only its own
        stored.remove("tiny-cnn@1.0.0")
        report = stored.gc()
        assert (report.trees_removed, report.trees_kept) == (0, 1) and tree.exists()
        torch.manual_seed(1)
        with torch.no_grad():
            y = twin(torch.randn(2, 3, 16, 16))
        assert "called " + " ".join(f"{v:.6f}" for v in y.flatten().tolist()) == want
        del twin
        gc.collect()
        assert stored.gc().trees_removed == 1 and not tree.exists()
    finally:
        sys.unraisablehook = hook
    assert unraisable == []
