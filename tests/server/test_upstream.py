"""`graft serve --upstream`: search and pages in front of the CNCF distribution registry
(Debian's docker-registry on 127.0.0.1), which holds the bytes."""

from __future__ import annotations

import shutil

import pytest

from tests.hub.oci.conftest import start_registry
from tests.server.test_interop import _graft

pytestmark = pytest.mark.skipif(shutil.which("docker-registry") is None,
                                reason="docker-registry is not installed (.ci/system-packages)")


def test_pages_and_search_for_what_the_distribution_registry_holds(serve, modules, tmp_path):
    upstream = start_registry(tmp_path / "distribution")
    try:
        home = tmp_path / "pusher"
        for directory, repo in ((modules["parent"], "vision/tiny-cnn"),
                                (modules["child"], "vision/tiny-pets")):
            out = _graft("-m", "graft.cli", "push", str(directory),
                         f"oci://{upstream.address}/{repo}", home=home)
            assert out.returncode == 0, out.stderr
        pages = serve("--upstream", f"oci://{upstream.address}/vision",
                      root=tmp_path / "index")
        with pages.client() as c:
            found = c.get("/api/v1/search", params={"q": "parent:tiny-cnn"}).json()["results"]
            assert [m["repository"] for m in found] == ["vision/tiny-pets"]
            detail = c.get("/api/v1/modules/vision/tiny-cnn").json()
            assert detail["children"][0]["repo"] == "vision/tiny-pets"
            page = c.get("/vision/tiny-pets")
            assert page.status_code == 200
            # The copy line names the upstream, where the bytes are.
            assert f'graft.load(&#34;oci://{upstream.address}/vision/tiny-pets:1.0.0&#34;)' \
                in page.text
            refused = c.get("/v2/vision/tiny-pets/manifests/1.0.0")
            assert refused.status_code == 404 and upstream.address in refused.text
        # And the line works: a client pulls from the upstream, not from the page server.
        out = _graft("-m", "graft.cli", "pull",
                     f"oci://{upstream.address}/vision/tiny-pets:1.0.0", home=tmp_path / "p")
        assert out.returncode == 0, out.stderr
    finally:
        upstream.stop()
