"""A pull killed halfway through a blob (SIGKILL at a named point) resumes with Range; a pull
stopped there holds that blob's partial file, and a download that waited for it takes the
finished blob."""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from graft.hub.oci.artifact import Descriptor
from graft.hub.oci.cache import BlobCache
from graft.hub.oci.client import RegistryClient
from graft.hub.oci.pull import pull
from graft.hub.oci.transfer import download
from graft.hub.store import Store
from tests.conftest import env_with_src
from tests.hub.oci.hostile import Hostile


def test_a_pull_killed_mid_blob_resumes_where_it_stopped(saved, tmp_path):
    server = Hostile()
    try:
        published = server.serve_module(saved.parent, "zoo/net")
        home = tmp_path / "home"
        ref = f"oci://{server.address}/zoo/net:1.0.0"
        env = {**env_with_src(), "GRAFT_HOME": str(home),
               "GRAFT_TEST_STOP_AT": "oci.pull.blob-half"}
        killed = subprocess.run([sys.executable, "-m", "graft.cli", "pull", ref], env=env,
                                capture_output=True, text=True, timeout=300)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        store = Store(home)
        assert store.list() == []  # nothing visible from the killed pull
        partial = home / "oci-cache" / "partial"
        sizes = {p.name.removesuffix(".part"): p.stat().st_size for p in partial.glob("*.part")}
        blobs = {d.hex: d for d in published["plan"].blobs().values()}
        halfway = {h: n for h, n in sizes.items() if 0 < n < blobs[h].size}
        complete = {h for h, n in sizes.items() if n == blobs[h].size}  # killed before rename
        assert halfway and all(n <= blobs[h].size for h, n in sizes.items())
        # gc keeps what the resume needs (no module holds these blobs; they are fresh)
        assert store.gc().downloads_removed == 0
        assert {p.name.removesuffix(".part"): p.stat().st_size
                for p in partial.glob("*.part")} == sizes
        before = len(server.log)

        stored = pull(ref, store=store)
        assert stored.digest == saved.parent_manifest.digest
        assert store.verify(stored.pinned_handle).digest == stored.digest
        resumed = {r["path"].rsplit(":", 1)[-1]: r["headers"].get("range")
                   for r in server.log[before:] if "/blobs/" in r["path"]}
        for hexdigest, size in halfway.items():
            assert resumed[hexdigest] == f"bytes={size}-"
        assert not complete & set(resumed)  # verified from disk, not fetched again
        assert not list(partial.glob("*.part"))
    finally:
        server.close()


def test_a_pull_stopped_mid_blob_holds_that_partial_file_and_no_lock_file(saved, tmp_path):
    server = Hostile()
    try:
        published = server.serve_module(saved.parent, "zoo/net")
        home = tmp_path / "home"
        env = {**env_with_src(), "GRAFT_HOME": str(home),
               "GRAFT_TEST_PAUSE_AT": "oci.pull.blob-half"}
        puller = subprocess.Popen([sys.executable, "-m", "graft.cli", "pull",
                                   f"oci://{server.address}/zoo/net:1.0.0"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, status = os.waitpid(puller.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), f"the pull ended instead (status {status})"
            partial = home / "oci-cache" / "partial"
            blobs = {d.hex: d for d in published["plan"].blobs().values()}
            halfway = [p for p in partial.glob("*.part")
                       if 0 < p.stat().st_size < blobs[p.name.removesuffix(".part")].size]
            assert halfway  # the stopped thread's blob (another thread's may be mid-way too)
            for path in halfway:  # each held by the thread writing it
                with open(path, "rb") as probe, pytest.raises(BlockingIOError):
                    fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert not list(partial.glob("*.lock"))
        finally:
            os.kill(puller.pid, signal.SIGCONT)
            _, err = puller.communicate(timeout=300)
        assert puller.returncode == 0, err
        assert not list(partial.iterdir())  # the pull leaves nothing behind there
        store = Store(home)
        assert store.verify(store.list()[0].handle).digest == saved.parent_manifest.digest
    finally:
        server.close()


def random_blob(size: int = 4096) -> tuple[bytes, Descriptor]:
    data = os.urandom(size)
    return data, Descriptor(media_type="application/octet-stream",
                            digest="sha256:" + hashlib.sha256(data).hexdigest(), size=size)


def test_a_download_that_waited_for_another_takes_its_blob(tmp_path):
    data, blob = random_blob()
    requests = []

    def refuse(request: httpx.Request) -> httpx.Response:
        requests.append(request.url)
        return httpx.Response(500)

    passed_first_look = threading.Event()

    class Cache(BlobCache):
        def partial(self, hexdigest: str):  # download() asks after its first look for the blob
            if threading.current_thread() is not threading.main_thread():
                passed_first_look.set()
            return super().partial(hexdigest)

    cache = Cache(tmp_path)
    got = []
    with RegistryClient("registry.test", transport=httpx.MockTransport(refuse),
                        retries=0) as client:
        with cache.partial_download(blob.hex) as other:  # another pull's download, under way
            waiter = threading.Thread(target=lambda: got.append(
                download(client, "zoo/net", blob, cache)))
            waiter.start()
            assert passed_first_look.wait(timeout=60)  # not done yet: it waits for the lock
            other.write(data)
            other.flush()
            os.replace(cache.partial(blob.hex), cache.blob(blob.hex))
        waiter.join(timeout=60)
    assert got == [cache.blob(blob.hex)] and cache.blob(blob.hex).read_bytes() == data
    assert requests == []  # nothing fetched again
    assert not list((tmp_path / "oci-cache" / "partial").iterdir())


def test_a_partial_file_longer_than_its_blob_is_started_over(tmp_path):
    data, blob = random_blob()
    ranges = []

    def serve(request: httpx.Request) -> httpx.Response:
        ranges.append(request.headers.get("range"))
        return httpx.Response(200, content=iter([data]))  # a body that streams

    cache = BlobCache(tmp_path)
    cache.partial(blob.hex).write_bytes(os.urandom(2 * len(data)))  # not this blob's bytes
    with RegistryClient("registry.test", transport=httpx.MockTransport(serve)) as client:
        path = download(client, "zoo/net", blob, cache)
    assert path.read_bytes() == data
    assert ranges == [None]  # the whole blob asked for, not a resume past its end
    assert not list((tmp_path / "oci-cache" / "partial").iterdir())
