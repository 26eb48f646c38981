"""graft.hub.blobs: what `graft add` does with files that are not regular files of the module.

Each case would block (a FIFO), read forever (a device), or copy a file from outside the module
(a symbolic or hard link) if the store opened the path the ordinary way. Every test runs the
add in a child process with a timeout, so a regression fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from graft.errors import IntegrityError, UnsafeContentError
from graft.hub.blobs import check_sources, open_regular
from graft.hub.store import Store
from tests.conftest import env_with_src

WEIGHTS = "weights.safetensors"
LABELS = "assets/labels.txt"

_ADD = """
import sys
from graft.errors import GraftError
from graft.hub.store import Store
try:
    Store(sys.argv[1]).add(sys.argv[2])
except GraftError as exc:
    print(type(exc).__name__, exc, sep="|")
    sys.exit(3)
print("added")
"""


def add_in_child(store: Store, source: Path) -> tuple[int, str]:
    """``Store.add`` in a fresh process; (exit status, "ErrorType|message" or "added")."""
    out = subprocess.run([sys.executable, "-c", _ADD, str(store.root), str(source)],
                         capture_output=True, text=True, env=env_with_src(), timeout=60)
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, out.stdout.strip()


def replace_with(path: Path, make: Callable[[Path], None]) -> None:
    path.unlink()
    make(path)


def assert_store_untouched(store: Store) -> None:
    blobs = store.root / "blobs"
    assert not blobs.exists() or not [p for p in blobs.rglob("*") if p.is_file()]
    assert store.list() == []


@pytest.mark.parametrize("rel", [WEIGHTS, LABELS])
def test_a_fifo_is_refused_without_blocking(store: Store, make_module: Callable[..., Path],
                                            rel: str) -> None:
    source = make_module()
    replace_with(source / rel, os.mkfifo)  # no writer: an ordinary open() waits forever
    code, out = add_in_child(store, source)
    assert code == 3 and out.startswith("UnsafeContentError|") and "FIFO" in out, out
    assert_store_untouched(store)


def test_a_fifo_manifest_is_refused_without_blocking(store: Store,
                                                     make_module: Callable[..., Path]) -> None:
    source = make_module()
    replace_with(source / "graft.json", os.mkfifo)
    code, out = add_in_child(store, source)
    assert code == 3 and "UnsafeContentError" in out and "FIFO" in out, out
    assert_store_untouched(store)


def test_a_device_is_refused_without_reading_it(store: Store, make_module: Callable[..., Path],
                                                tmp_path: Path) -> None:
    source = make_module()
    (source / WEIGHTS).unlink()
    try:  # /dev/zero's numbers: reading it never ends
        os.mknod(source / WEIGHTS, stat.S_IFCHR | 0o644, os.makedev(1, 5))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot create a device node here ({exc})")
    code, out = add_in_child(store, source)
    assert code == 3 and "UnsafeContentError" in out and "character device" in out, out
    assert_store_untouched(store)


def test_a_directory_is_refused(store: Store, make_module: Callable[..., Path]) -> None:
    source = make_module()
    replace_with(source / LABELS, lambda p: p.mkdir())
    code, out = add_in_child(store, source)
    assert code == 3 and "UnsafeContentError" in out and "a directory" in out, out
    assert_store_untouched(store)


@pytest.mark.parametrize("where", ["file", "folder"])
def test_a_symbolic_link_is_refused(store: Store, make_module: Callable[..., Path],
                                    tmp_path: Path, where: str) -> None:
    source = make_module()
    outside = tmp_path / "outside"
    outside.mkdir()
    if where == "file":
        (outside / "labels.txt").write_bytes((source / LABELS).read_bytes())
        replace_with(source / LABELS, lambda p: p.symlink_to(outside / "labels.txt"))
    else:  # the folder holding the file is the link
        (source / LABELS).rename(outside / "labels.txt")
        (source / "assets").rmdir()
        (source / "assets").symlink_to(outside)
    code, out = add_in_child(store, source)
    assert code == 3 and "UnsafeContentError" in out and "link" in out, out
    assert_store_untouched(store)


def test_a_hard_link_from_outside_is_refused(store: Store, make_module: Callable[..., Path],
                                             tmp_path: Path) -> None:
    source = make_module()
    secret = tmp_path / "secret.txt"  # say ~/.ssh/id_rsa: the store must not copy it in
    secret.write_bytes((source / LABELS).read_bytes())
    replace_with(source / LABELS, lambda p: os.link(secret, p))
    code, out = add_in_child(store, source)
    assert code == 3 and "UnsafeContentError" in out and "hard link" in out, out
    assert_store_untouched(store)


def test_hard_links_inside_the_module_are_accepted(store: Store,
                                                   make_module: Callable[..., Path]) -> None:
    data = b"the same bytes under two listed names\n"
    source = make_module(contents={"assets/a.txt": data, "assets/b.txt": data})
    replace_with(source / "assets/b.txt", lambda p: os.link(source / "assets/a.txt", p))
    stored = store.add(source)
    assert (stored.path / "assets/b.txt").read_bytes() == data


def test_open_regular_reads_what_it_checked(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.bin").write_bytes(b"abc")
    with open_regular(tmp_path, "sub/f.bin") as f:
        os.replace(tmp_path / "sub" / "f.bin", tmp_path / "moved")  # swapped after the check
        (tmp_path / "sub" / "f.bin").write_bytes(b"xyz")
        assert f.read() == b"abc"  # the descriptor is the file that was checked
    with pytest.raises(IntegrityError, match="missing"):
        open_regular(tmp_path, "sub/nothing")
    with pytest.raises(UnsafeContentError):
        open_regular(tmp_path, "../escape")
    with pytest.raises(UnsafeContentError, match="link"):
        (tmp_path / "link").symlink_to(tmp_path / "moved")
        check_sources(tmp_path, ["link"])
