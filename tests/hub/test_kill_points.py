"""A writer SIGKILLed at every named stop point leaves a consistent store, and the next writer
cleans up after it.

The child kills itself at the point (``GRAFT_TEST_STOP_AT``, see graft._testing), so each case
tests the state it names on every run, whatever the machine's speed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from graft.errors import ModuleNotFound
from graft.format.manifest import Manifest
from graft.hub.store import Store
from tests.conftest import env_with_src
from tests.hub.conftest import program_bytes, random_bytes, weights_bytes
from tests.hub.test_store import PROGRAM, WEIGHTS, assert_consistent, assert_no_leftovers

_WRITER = """
import sys
from graft.hub.store import Store
store = Store(sys.argv[1])
action, arg = sys.argv[2], sys.argv[3]
if action == "add":
    store.add(arg)
elif action == "rm":
    store.remove(arg)
elif action == "gc":
    store.gc()
print("finished")
"""


def run_writer(store: Store, point: str, action: str, arg: str = "-") -> int:
    env = env_with_src()
    env["GRAFT_TEST_STOP_AT"] = point
    out = subprocess.run([sys.executable, "-c", _WRITER, str(store.root), action, arg],
                         capture_output=True, text=True, env=env, timeout=120)
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode


@pytest.fixture
def populated(store: Store, make_module: Callable[..., Path]) -> tuple[Store, Path, bytes]:
    """A store holding 'small', and the source of 'big', which shares its program blob."""
    program = program_bytes("shared")
    store.add(make_module("small", contents={PROGRAM: program}))
    big = make_module("big", contents={PROGRAM: program,
                                       WEIGHTS: weights_bytes("big", extra=16 << 10),
                                       "assets/part-1.bin": random_bytes(8 << 10),
                                       "assets/part-2.bin": random_bytes(8 << 10)})
    return store, big, program


# point in Store.add -> what the next gc does with what the killed add left
ADD_POINTS = {
    "add.checked": None,  # nothing written yet
    "add.blob-placed#1": None,  # one new blob published, the rest not begun
    # the weights' header and 3 tensor blobs come first, then the files
    "add.blob-placed#8": None,  # every blob in place (7 new, 1 shared), no tree
    "add.tree-built": None,  # the tree complete in tmp/, not renamed
    "add.tree-published": "adopted",  # the tree in place, no row
    "add.row-inserted": "adopted",  # the row inserted, not committed
}


@pytest.mark.parametrize("point", sorted(ADD_POINTS))
def test_kill_during_add(populated: tuple[Store, Path, bytes], point: str) -> None:
    store, big, _ = populated
    small = store.resolve("small")
    assert run_writer(store, point, "add", str(big)) == -signal.SIGKILL
    expected = ADD_POINTS[point]

    # a reader sees a consistent store: 'big' is absent (never half there)
    assert [m.name for m in assert_consistent(store)] == ["small"]
    with pytest.raises(ModuleNotFound):
        store.resolve("big")

    report = store.gc()  # the next writer
    tmp_left = point not in ("add.checked",)
    assert report.tmp_removed == (1 if tmp_left else 0), report
    if expected == "adopted":
        # the tree was complete: gc indexes it again rather than deleting a whole module
        assert report.trees_adopted == 1 and report.blobs_removed == 0, report
        assert store.verify("big").digest == Manifest.read(big).digest
    else:
        new_blobs = {"add.checked": 0, "add.blob-placed#1": 1, "add.blob-placed#8": 7,
                     "add.tree-built": 7}[point]
        assert (report.trees_adopted, report.blobs_removed) == (0, new_blobs), report
        with pytest.raises(ModuleNotFound):
            store.resolve("big")
    assert store.verify(small.handle) == small
    assert_no_leftovers(store)
    # and adding again works from any of these states
    assert store.add(big).digest == Manifest.read(big).digest
    assert_consistent(store)
    store.gc()
    assert_no_leftovers(store)


def test_kill_after_the_tree_then_add_again_replaces_it(populated: tuple[Store, Path, bytes]
                                                         ) -> None:
    store, big, _ = populated
    assert run_writer(store, "add.tree-published", "add", str(big)) == -signal.SIGKILL
    stored = store.add(big)  # the next writer is an add, not a gc: it takes the tree over
    assert store.verify("big") == stored
    store.gc()
    assert_no_leftovers(store)


def test_kill_during_remove(populated: tuple[Store, Path, bytes]) -> None:
    store, big, _ = populated
    stored = store.add(big)
    for point in ("rm.unindexed", "rm.tree-deleted"):
        assert run_writer(store, point, "rm", "big@1.0.0") == -signal.SIGKILL
        with pytest.raises(ModuleNotFound):  # the row went first: it is gone for readers
            store.resolve("big")
        assert [m.name for m in assert_consistent(store)] == ["small"]
        assert stored.path.exists() == (point == "rm.unindexed")
        report = store.gc()  # removed on purpose: the tree goes, it is not adopted
        assert report.trees_adopted == 0
        assert report.trees_removed == (1 if point == "rm.unindexed" else 0)
        # all but the program, which 'small' shares: 3 files, the weights' header, 3 tensors
        assert report.blobs_removed == 7
        assert not stored.path.exists()
        assert_no_leftovers(store)
        assert store.add(big).digest == stored.digest  # and it can come back


def test_kill_during_gc(populated: tuple[Store, Path, bytes]) -> None:
    store, big, _ = populated
    store.add(big)
    store.remove("big@1.0.0")
    assert run_writer(store, "gc.blob-deleted#2", "gc") == -signal.SIGKILL
    assert [m.name for m in assert_consistent(store)] == ["small"]
    report = store.gc()
    assert report.blobs_removed == 5  # of 7: two went before the kill
    assert_no_leftovers(store)


_SAVER = """
import sys, torch
sys.path.insert(0, {repo!r})
from tests.conftest import TinyCNN
import graft
torch.manual_seed(0)
graft.save(TinyCNN(), {target!r}, name="killed", version="1.0.0",
           example_inputs=(torch.randn(2, 3, 16, 16),))
print("saved", flush=True)
"""


@pytest.mark.parametrize("point, into", [("save.written", "store"),
                                         ("save.written", "directory")])
def test_kill_during_save(tmp_path: Path, graft_home: Path, point: str, into: str) -> None:
    target = "killed@1.0.0" if into == "store" else str(tmp_path / "out" / "killed")
    script = _SAVER.format(repo=str(Path(__file__).parents[2]), target=target)
    env = env_with_src()
    env["GRAFT_TEST_STOP_AT"] = point
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr
    if into == "directory":
        # never a half module at the target: only the hidden staging folder is left
        assert not Path(target).exists()
        assert [p.name.startswith(".killed.partial-") for p in (tmp_path / "out").iterdir()] \
            == [True]
        return
    store = Store(graft_home)
    assert store.list() == []
    report = store.gc()
    assert report.tmp_removed == 1  # the dead process's staging folder
    assert_no_leftovers(store)
