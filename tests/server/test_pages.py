"""The web pages in headless Chromium (Debian's, driven by Playwright): search, the module
page's signatures, lineage and copy line, and a hostile model card that runs nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.conftest import push_module, save_tiny

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
HOSTILE = """# Innocent model

<script>window.__pwned = 1</script>

[click me](javascript:window.__pwned=2)

<img src=x onerror="window.__pwned=3">

<a href="javascript:window.__pwned=4">raw link</a>
"""


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed")
    with playwright.sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield instance
        instance.close()


def test_search_module_page_lineage_copy_line_and_hostile_card(server, modules, browser,
                                                                tmp_path):
    token = server.token("vision")
    hostile = save_tiny(tmp_path / "hostile", name="hostile", card=HOSTILE, seed=5,
                        description="a module with a hostile card")
    with server.client(token) as c:
        assert push_module(c, "vision/tiny-cnn", modules["parent"]).status_code == 201
        assert push_module(c, "vision/tiny-pets", modules["child"]).status_code == 201
        assert push_module(c, "vision/hostile", hostile).status_code == 201
        assert "script-src 'self'" in c.get("/").headers["content-security-policy"]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    documents: list[tuple[str, str | None]] = []
    page.on("response", lambda r: documents.append((r.url, r.headers.get(
        "content-security-policy"))) if r.request.resource_type == "document" else None)

    page.goto(server.url + "/")
    page.fill("input[name=q]", "pets")
    page.click("form.search button")
    page.wait_for_url("**/search?q=pets")
    results = page.locator("ul.cards li.card a.name")
    assert results.all_inner_texts() == ["vision/tiny-pets"]
    page.screenshot(path=str(SCREENSHOTS / "search.png"), full_page=True)

    results.first.click()
    page.wait_for_url("**/vision/tiny-pets")
    table = page.locator("table.signatures").inner_text()
    assert "forward" in table and "images: float32[batch,3,16,16]" in table
    assert page.locator("#copy-line").inner_text() == \
        f'graft.load("oci://{server.host}/vision/tiny-pets:1.0.0")'
    # The lineage names the parent, linked to its page, and the parent's page the child.
    assert page.locator("svg.lineage").text_content().count("vision/tiny-cnn") == 2  # text, title
    page.locator("a.parent").click()
    page.wait_for_url("**/vision/tiny-cnn?version=1.0.0")
    assert page.locator("a.child").inner_text() == "vision/tiny-pets v1.0.0"
    assert "conv1" in page.locator("article.card-body").inner_text()  # the card's table
    page.screenshot(path=str(SCREENSHOTS / "module.png"), full_page=True)

    phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    phone.goto(server.url + "/vision/tiny-pets")
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= 390  # nothing overflows the phone's width (tables scroll inside)
    phone.screenshot(path=str(SCREENSHOTS / "module-phone.png"), full_page=True)

    page.goto(server.url + "/vision/hostile")
    body = page.locator("article.card-body")
    assert "<script>" in body.inner_text()  # shown as text
    for link in body.locator("a").all():
        assert not (link.get_attribute("href") or "").startswith("javascript:")
    for link in page.locator("article.card-body a, article.card-body img").all():
        link.click(timeout=2000, no_wait_after=True) if link.is_visible() else None
    assert page.evaluate("window.__pwned === undefined")
    assert body.locator("script, img[onerror]").count() == 0
    page.screenshot(path=str(SCREENSHOTS / "hostile.png"), full_page=True)
    assert errors == []  # no script error, no failed resource on any page so far

    page.goto(server.url + "/vision")  # the namespace page lists all three
    assert sorted(page.locator("a.name").all_inner_texts()) == [
        "vision/hostile", "vision/tiny-cnn", "vision/tiny-pets"]
    missing = page.goto(server.url + "/vision/nothing")
    assert missing.status == 404 and "no module vision/nothing" in page.inner_text("main")
    # Every page came with the policy that forbids inline script.
    assert len(documents) >= 7
    assert all(csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
               for _, csp in documents), documents
