"""The server's small pure pieces, checked directly: names, version order, model cards,
the lineage graph's escaping, search terms."""

from __future__ import annotations

import pytest

from graft.errors import RequestRefused
from graft.server.cards import render_card
from graft.server.lineage import lineage_svg
from graft.server.names import check_digest, check_repository, check_tag
from graft.server.registry import is_version_tag, version_key
from graft.server.search import ModuleSummary


@pytest.mark.parametrize("name", ["ns/m", "a.b/c-d/e__f", "x0/y" + "z" * 200])
def test_valid_repository_names(name):
    assert check_repository(name) == name


@pytest.mark.parametrize("name", ["m", "ns/../m", "ns//m", "/ns/m", "ns/m/", "ns/M", "ns/m\x00",
                                  "ns/-m", "api/m", "static/x", "ns/" + "m" * 253, "ns/./m"])
def test_invalid_repository_names(name):
    with pytest.raises(RequestRefused) as info:
        check_repository(name)
    assert info.value.status == 400 and info.value.code == "NAME_INVALID"


def test_tags_and_digests():
    assert check_tag("1.0.0_build.1") == "1.0.0_build.1"
    for bad in ("", ".x", "-x", "a/b", "t" * 129):
        with pytest.raises(RequestRefused):
            check_tag(bad)
    for bad in ("sha256:" + "A" * 64, "sha512:" + "a" * 64, "sha256:" + "a" * 63, "sha256:../x"):
        with pytest.raises(RequestRefused):
            check_digest(bad)


def test_versions_sort_numerically_with_prereleases_first():
    versions = ["1.10.0", "1.2.0", "1.2.0-rc1", "2", "1.2", "0.9.9"]
    ordered = sorted(versions, key=version_key)
    assert ordered[:2] == ["0.9.9", "1.2.0-rc1"] and ordered[-2:] == ["1.10.0", "2"]
    assert set(ordered[2:4]) == {"1.2", "1.2.0"}  # the same version, written two ways
    assert max(versions, key=version_key) == "2"
    assert version_key("1.2.0-rc1") < version_key("1.2.0") < version_key("1.10.0")
    assert is_version_tag("1.0.0") and is_version_tag("1.0.0_local") and is_version_tag("3")
    assert not is_version_tag("latest") and not is_version_tag("sha256-abc")


@pytest.mark.parametrize("source", [
    "<script>alert(1)</script>",
    "[x](javascript:alert(1))",
    "[x](JaVaScRiPt:alert(1))",
    "<a href='javascript:alert(1)'>x</a>",
    "<img src=x onerror=alert(1)>",
    "![x](javascript:alert(1))",
    "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    '<iframe src="https://evil.example"></iframe>',
])
def test_hostile_markdown_renders_inert(source):
    html = str(render_card(f"# Card\n\n{source}\n"))
    lowered = html.lower()
    assert "<script" not in lowered and "<iframe" not in lowered and "<img src=x" not in lowered
    assert 'href="javascript:' not in lowered and 'src="javascript:' not in lowered
    assert "onerror=" not in lowered.replace("&lt;img src=x onerror=alert(1)&gt;", "")
    assert 'href="data:' not in lowered


def test_markdown_keeps_what_a_card_needs():
    html = str(render_card("# T\n\n**b** [ok](https://example.org)\n\n| a |\n|---|\n| 1 |\n"))
    assert "<strong>b</strong>" in html and "<table>" in html
    assert '<a href="https://example.org" rel="nofollow noopener noreferrer">ok</a>' in html


def test_lineage_escapes_labels():
    svg = str(lineage_svg({"title": "<b>x</b>", "subtitle": "v1"},
                          [{"title": '"><script>', "subtitle": "", "href": "/a?x=<y>"}], []))
    assert "<script>" not in svg and "&lt;b&gt;" in svg and "/a?x=&lt;y&gt;" in svg


def test_search_terms_match_fields():
    m = ModuleSummary("vision/pets", "pets", "1.0.0", "Cat breeds", "sha256:" + "0" * 64,
                      "sha256:" + "1" * 64, "2026-01-01",
                      [("classify", "images: float32[batch,3,224,224]", "logits: float32[batch,3]")],
                      [("efficientnet-lite0@1.0.0", "sha256:" + "2" * 64)])
    assert m.matches("cat") and m.matches("PETS") and m.matches("classify")
    assert m.matches("input:float32[batch,3,224") and not m.matches("output:224")
    assert m.matches("parent:efficientnet") and not m.matches("name:efficientnet")
    assert not m.matches("dog")
