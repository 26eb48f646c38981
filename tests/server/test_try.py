"""The "Try it" pages of `graft serve`, in headless Chromium against the real server.

A tiny image module is pushed; its try page is made by the server on first request (ONNX
export from the server's own blobs, parity-checked) and run by ONNX Runtime Web in the page:
the probabilities it shows must be PyTorch's. A module whose signature the page cannot run
(nearest-neighbour resizing, which the page does not implement) gets a clear message, and its
module page stops offering the link once that failure is kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

import graft
from tests.conftest import TinyCNN
from tests.server.conftest import push_module

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
DIST = Path(__file__).resolve().parents[2] / "web" / "dist"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (bash .ci/system-packages installs it)")
    if not (DIST / "app.js").is_file():
        pytest.skip("the page's bundle is not built; run `make install`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _image_module(path: Path, interpolation: str) -> Path:
    torch.manual_seed(0)
    graft.save(TinyCNN(), path, name="tiny-try", version="1.0.0", description="tiny image CNN",
               signatures={"classify": graft.Signature(
                   inputs={"images": "float32[batch,3,16,16]"},
                   preprocess=graft.ImagePreprocess(size=16, resize=16, mean=(0.5,) * 3,
                                                    std=(0.5,) * 3,
                                                    interpolation=interpolation))},
               assets={"labels.txt": "ant\nbee\ncat\ndog\n"}, variants=("eval",))
    return path


def test_try_page_runs_the_module_as_pytorch_does(serve, browser, tmp_path):
    from PIL import Image

    good = _image_module(tmp_path / "good", "bilinear")
    bad = _image_module(tmp_path / "bad", "nearest")
    server = serve()
    token = server.token("vision")
    with server.client(token) as c:
        assert push_module(c, "vision/tiny-try", good).status_code == 201
        assert push_module(c, "vision/tiny-nearest", bad).status_code == 201
        page_html = c.get("/vision/tiny-try")
        strict = page_html.headers["content-security-policy"]
        bad_before = c.get("/vision/tiny-nearest").text
    href = "/vision/tiny-try/-/try/1.0.0/classify/"
    assert f'href="{href}"' in page_html.text
    assert "wasm-unsafe-eval" not in strict and "script-src 'self';" in strict
    assert 'href="/vision/tiny-nearest/-/try/1.0.0/classify/"' in bad_before

    # A 24 x 20 photo-like image: the page resizes and crops it itself.
    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(photo)
    with torch.no_grad():
        expected = graft.load(good).call("classify", [str(photo)]).softmax(-1)[0].double()

    context = browser.new_context()
    try:
        page = context.new_page()
        crashes: list[str] = []
        page.on("pageerror", lambda e: crashes.append(str(e)))
        # The first request makes the ONNX models: allow for the export.
        response = page.goto(f"{server.url}/vision/tiny-try/-/try?version=1.0.0",
                             timeout=240_000)
        assert response is not None and response.status == 200
        assert page.url == server.url + href
        csp = response.headers["content-security-policy"]
        assert "'wasm-unsafe-eval'" in csp and "'unsafe-inline'" not in csp
        assert page.evaluate("window.graftPage.ready") is True, \
            page.evaluate("window.graftPage.errors")
        # Cross-origin isolated, so ONNX Runtime Web runs on as many threads as it may.
        assert response.headers["cross-origin-embedder-policy"] == "require-corp"
        assert page.evaluate("self.crossOriginIsolated") is True
        cores = page.evaluate("navigator.hardwareConcurrency")
        assert page.evaluate("window.graftPage.threads") == min(4, cores)
        page.evaluate("window.graftPage.last = null")
        page.set_input_files("#try-file", str(photo))
        page.wait_for_function("window.graftPage.last !== null || window.graftPage.errors.length",
                               timeout=60_000)
        shown = page.evaluate("window.graftPage.last")
        assert shown is not None, page.evaluate("window.graftPage.errors")
        got = torch.tensor(shown["probs"], dtype=torch.float64)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        threads = "1 thread" if cores == 1 else f"{min(4, cores)} threads"
        assert f"(WebAssembly, {threads})" in page.inner_text("#try-time")
        assert not crashes, crashes
        page.screenshot(path=str(tmp_path / "try.png"), full_page=True)

        # The models are kept by module digest: a second visit exports nothing.
        digest = graft.load(good).digest.removeprefix("sha256:")
        site = json.loads((server.root / "try" / digest / "classify" / "site.json").read_text())
        assert site["run"]["config"]["parity"]["max_abs_diff"] <= 1e-4

        failed = page.goto(f"{server.url}/vision/tiny-nearest/-/try?version=1.0.0",
                           timeout=240_000)
        assert failed is not None and failed.status == 422
        message = page.inner_text("#try-failed")
        assert "nearest" in message and "classify" in message, message
        assert "wasm-unsafe-eval" not in failed.headers["content-security-policy"]
    finally:
        context.close()
    with server.client() as c:
        after = c.get("/vision/tiny-nearest").text
        again = c.get("/vision/tiny-nearest/-/try/1.0.0/classify/")
        assert c.get("/vision/tiny-try/-/try/1.0.0/classify/models/../../x").status_code == 404
        assert c.get("/vision/tiny-try/-/try/1.0.0/nosuch/").status_code == 404
    assert "/-/try/" not in after
    assert again.status_code == 422 and "nearest" in again.text
    assert server.proc.poll() is None
