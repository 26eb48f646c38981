"""One exported site, one static server on 127.0.0.1 and one headless Chromium per session."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import graft.zoo

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="session")
def web_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding the real efficientnet-lite0, imported once for the web tests."""
    home = tmp_path_factory.mktemp("web-home")
    previous = os.environ.get("GRAFT_HOME")
    os.environ["GRAFT_HOME"] = str(home)
    try:
        graft.zoo.import_module("efficientnet-lite0")
    finally:
        if previous is None:
            os.environ.pop("GRAFT_HOME", None)
        else:
            os.environ["GRAFT_HOME"] = previous
    return home


@pytest.fixture
def web_store(web_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GRAFT_HOME", str(web_home))
    return web_home


@pytest.fixture(scope="session")
def site(web_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`graft export web efficientnet-lite0`, written once."""
    from graft.cli import main

    out = tmp_path_factory.mktemp("site") / "site"
    previous = os.environ.get("GRAFT_HOME")
    os.environ["GRAFT_HOME"] = str(web_home)
    try:
        assert main(["export", "web", "efficientnet-lite0", "-o", str(out)]) == 0
    finally:
        if previous is None:
            os.environ.pop("GRAFT_HOME", None)
        else:
            os.environ["GRAFT_HOME"] = previous
    return out


class _Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".wasm": "application/wasm", ".mjs": "text/javascript",
                      ".onnx": "application/octet-stream"}

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def site_url(site: Path) -> Iterator[str]:
    """The site on a plain static server, as a user would serve it."""
    handler = functools.partial(_Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    thread.join(timeout=10)
    server.server_close()


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (bash .ci/system-packages installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, site_url: str, tmp_path: Path) -> Iterator[object]:
    """A fresh page on the site, loaded and ready; console errors are collected."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.crashes = []  # type: ignore[attr-defined]
    page.on("crash", lambda p: page.crashes.append("crashed"))
    page.on("pageerror", lambda e: page.crashes.append(str(e)))
    page.goto(site_url)
    assert page.evaluate("window.graftPage.ready") is True, page.evaluate("window.graftPage.errors")
    yield page
    context.close()


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """scikit-image's sample photos as PNG files (lossless: the page decodes the same pixels)."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    names = ("chelsea", "astronaut", "coffee", "rocket", "immunohistochemistry", "retina",
             "cell", "hubble_deep_field", "brick", "grass", "gravel", "moon", "camera")
    out = {}
    for name in names:
        pixels = getattr(data, name)()
        if pixels.dtype != np.uint8:
            pixels = pixels.astype(np.uint8)
        path = folder / f"{name}.png"
        Image.fromarray(pixels).save(path)
        out[name] = path
    # A new photo for a trained head: the cat, mirrored.
    Image.fromarray(np.ascontiguousarray(data.chelsea()[:, ::-1])).save(folder / "mirrored.png")
    out["mirrored"] = folder / "mirrored.png"
    return out


@pytest.fixture(scope="session")
def text_site_url(web_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`graft export web minilm-l6` on its own static server."""
    from graft.export.web import export_web

    out = tmp_path_factory.mktemp("text-site") / "site"
    previous = os.environ.get("GRAFT_HOME")
    os.environ["GRAFT_HOME"] = str(web_home)
    try:
        graft.zoo.import_module("minilm-l6")
        export_web("minilm-l6", out)
    finally:
        if previous is None:
            os.environ.pop("GRAFT_HOME", None)
        else:
            os.environ["GRAFT_HOME"] = previous
    handler = functools.partial(_Quiet, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    thread.join(timeout=10)
    server.server_close()
