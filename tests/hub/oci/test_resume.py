"""A pull killed halfway through a blob (SIGKILL at a named point) resumes with Range."""

from __future__ import annotations

import signal
import subprocess
import sys

from graft.hub.oci.pull import pull
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
