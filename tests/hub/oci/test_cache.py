"""``graft gc`` and ``oci-cache/`` (graft.hub.oci.cache): what no pull needs is deleted, what
an interrupted pull resumes from is kept for the resume window, and nothing is touched while
a pull runs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from graft.hub.oci.cache import RESUME_WINDOW, BlobCache
from graft.hub.store import Store
from tests.conftest import env_with_src


def put(path: Path, data: bytes, *, age: float = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if age:
        past = time.time() - age
        os.utime(path, (past, past))
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def downloads(store: Store) -> set[str]:
    cache = store.root / "oci-cache"
    return {p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()}


def fill(store: Store, stored_blob: str) -> dict[str, str]:
    """An oci-cache as interrupted and finished pulls leave it; name -> its path there."""
    cache = store.root / "oci-cache"
    fresh, old, done, mid = b"fresh blob", b"old blob", b"finished", b"half"
    paths = {
        "in_store": f"blobs/{stored_blob}",  # downloaded, and the store holds it now
        "fresh_blob": f"blobs/{sha(fresh)}",  # downloaded, no module yet: a pull resumes it
        "old_blob": f"blobs/{sha(old)}",
        "fresh_part": f"partial/{sha(mid)}.part",
        "old_lock": f"partial/{sha(mid)}.lock",  # an earlier version's per-blob lock file
        "old_part": f"partial/{sha(b'old half')}.part",
        "part_of_done": f"partial/{sha(fresh)}.part",  # its blob is already downloaded
        "part_in_store": f"partial/{stored_blob}.part",
        "lonely_lock": f"partial/{sha(done)}.lock",  # ... of a finished download
        "record": f"refs/manifest-{sha(b'm')}.json",
    }
    week = RESUME_WINDOW + 60
    put(cache / paths["in_store"], b"x" * 100)
    put(cache / paths["fresh_blob"], fresh)
    put(cache / paths["old_blob"], old, age=week)
    put(cache / paths["fresh_part"], mid)
    put(cache / paths["old_lock"], b"")
    put(cache / paths["old_part"], b"old", age=week)
    put(cache / paths["part_of_done"], b"fre")
    put(cache / paths["part_in_store"], b"xx")
    put(cache / paths["lonely_lock"], b"")
    put(cache / paths["record"], b'{"module": "sha256:' + b"0" * 64 + b'"}', age=week)
    return paths


def test_gc_deletes_downloads_no_pull_needs(store: Store,
                                            make_module: Callable[..., Path]) -> None:
    module = store.add(make_module())
    stored_blob = module.manifest().files["assets/labels.txt"].sha256
    paths = fill(store, stored_blob)
    before = downloads(store)

    report = store.gc()

    kept = {paths[k] for k in ("fresh_blob", "fresh_part", "record")}
    assert downloads(store) == kept
    assert report.downloads_removed == 5  # in_store, old_blob, old_part, part_of_done,
    assert not report.downloads_busy      # part_in_store; lock files are not counted
    assert len(before) == 10
    assert store.resolve(module.handle) == module  # the store's own blob stayed

    report = store.gc(downloads=True)
    assert downloads(store) == {paths["record"]}  # records are kept (they are shortcuts)
    assert report.downloads_removed == 2


def test_gc_leaves_the_downloads_while_a_pull_runs(store: Store,
                                                   make_module: Callable[..., Path]) -> None:
    module = store.add(make_module())
    fill(store, module.manifest().files["assets/labels.txt"].sha256)
    before = downloads(store)
    # another process holds the cache as a pull does, until told to stop
    code = ("import sys; from pathlib import Path; from graft.hub.oci.cache import BlobCache\n"
            f"with BlobCache(Path({str(store.root)!r})).transfer():\n"
            "    print('holding', flush=True); sys.stdin.readline()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env_with_src())
    try:
        assert holder.stdout.readline().strip() == "holding"
        report = store.gc(downloads=True)
        assert report.downloads_busy and report.downloads_removed == 0
        assert downloads(store) >= before
    finally:
        holder.communicate("done\n", timeout=60)
    assert store.gc(downloads=True).downloads_removed == 7
    assert not store.gc().downloads_busy


def test_the_cli_says_what_gc_did_with_the_downloads(store: Store,
                                                     make_module: Callable[..., Path]) -> None:
    module = store.add(make_module())
    fill(store, module.manifest().files["assets/labels.txt"].sha256)
    out = subprocess.run([sys.executable, "-m", "graft.cli", "gc", "--downloads"],
                         capture_output=True, text=True, timeout=120,
                         env={**env_with_src(), "GRAFT_HOME": str(store.root)})
    assert out.returncode == 0, out.stderr
    assert "removed 7 registry downloads no pull needs" in out.stdout
    assert BlobCache(store.root).module_of("sha256:" + sha(b"m")) == "sha256:" + "0" * 64
