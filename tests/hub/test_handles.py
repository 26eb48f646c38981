"""Tests for graft.hub.handles: every accepted form, and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from graft.errors import HandleError
from graft.hub.handles import Handle, is_store_handle, parse_handle

HEX = "0123456789abcdef" * 4


@pytest.mark.parametrize(("text", "name", "version", "digest"), [
    ("tiny-cnn", "tiny-cnn", None, None),
    ("efficientnet-lite0", "efficientnet-lite0", None, None),
    ("a.b_c-d", "a.b_c-d", None, None),
    ("tiny@1", "tiny", "1", None),
    ("tiny@1.0.0", "tiny", "1.0.0", None),
    ("tiny@1.10.0-rc.1", "tiny", "1.10.0-rc.1", None),
    (f"tiny@sha256:{HEX}", "tiny", None, f"sha256:{HEX}"),
    (f"tiny@sha256:{HEX.upper()}", "tiny", None, f"sha256:{HEX}"),
])
def test_store_handles(text: str, name: str, version: str | None, digest: str | None) -> None:
    handle = parse_handle(text)
    assert handle == Handle("store", name=name, version=version, digest=digest)
    assert handle.pinned == (version is not None or digest is not None)
    assert is_store_handle(text)
    assert parse_handle(str(handle)) == handle


@pytest.mark.parametrize(("text", "expected"), [
    ("./tiny", Path("tiny")),
    ("../modules/tiny", Path("../modules/tiny")),
    ("/abs/modules/tiny", Path("/abs/modules/tiny")),
    ("modules/tiny@1.0.0", Path("modules/tiny@1.0.0")),
    (".", Path(".")),
    ("~/modules/tiny", Path("~/modules/tiny").expanduser()),
    ("file:///abs/modules/tiny", Path("/abs/modules/tiny")),
    ("file://localhost/abs/my%20module", Path("/abs/my module")),
])
def test_path_handles(text: str, expected: Path) -> None:
    handle = parse_handle(text)
    assert handle.kind == "path"
    assert handle.path == expected
    assert handle.name is None
    assert not is_store_handle(text)


def test_pathlike_is_a_path_handle(tmp_path: Path) -> None:
    # even a bare word is a directory when it comes as a Path
    assert parse_handle(Path("tiny")) == Handle("path", path=Path("tiny"))
    assert parse_handle(tmp_path) == Handle("path", path=tmp_path)
    assert str(parse_handle(tmp_path)) == str(tmp_path)


def test_handle_passes_through() -> None:
    handle = parse_handle("tiny@1.0.0")
    assert parse_handle(handle) is handle


@pytest.mark.parametrize(("text", "name", "version"), [
    ("https://hub.example.com/vision/tiny@1.2.0", "tiny", "1.2.0"),
    ("http://127.0.0.1:8000/ns/tiny", "tiny", None),
    ("https://hub.example.com/api/v1/Not_A_Name!", None, None),
])
def test_url_handles(text: str, name: str | None, version: str | None) -> None:
    handle = parse_handle(text)
    assert handle.kind == "url"
    assert handle.url == text
    assert (handle.name, handle.version) == (name, version)
    assert str(handle) == text
    assert not is_store_handle(text)


@pytest.mark.parametrize("text", [
    "",
    " tiny",
    "tiny ",
    "Tiny",
    "-tiny",
    "tiny@",
    "tiny@latest",
    "tiny@1.0.0.0",
    "tiny@v1",
    "tiny@1.0@2.0",
    "tiny@sha256:abc",
    f"tiny@sha256:{HEX}0",
    f"tiny@sha1:{HEX}",
    "@1.0.0",
    "ftp://host/tiny",
    "https:///tiny",
    "file://host/abs/tiny",
    "file://relative/tiny",
])
def test_malformed_handles_are_refused(text: str) -> None:
    with pytest.raises(HandleError) as info:
        parse_handle(text)
    message = str(info.value)
    assert repr(text) in message  # says what it received
    assert not is_store_handle(text)


def test_error_lists_the_accepted_forms() -> None:
    with pytest.raises(HandleError, match=r"'name@1\.0\.0'.*'name@sha256:<64 hex>'.*https"):
        parse_handle("Tiny@1.0")
    with pytest.raises(ValueError):  # HandleError is also a ValueError
        parse_handle("tiny@latest")


@pytest.mark.parametrize("value", [None, 3, b"tiny", 1.5])
def test_non_strings_are_refused(value: object) -> None:
    with pytest.raises(HandleError, match="str or"):
        parse_handle(value)  # type: ignore[arg-type]


def test_handle_checks_its_fields() -> None:
    with pytest.raises(HandleError):
        Handle("registry", name="tiny")
    with pytest.raises(HandleError):
        Handle("store")
    with pytest.raises(HandleError):
        Handle("store", name="tiny", version="1.0.0", digest=f"sha256:{HEX}")
    with pytest.raises(HandleError):
        Handle("store", name="tiny", digest="sha256:xyz")
