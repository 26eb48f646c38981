"""Declarative preprocessing turns raw images and strings into the signature's tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import graft
from graft.errors import DataError, FormatError, SignatureError, UnsafeContentError
from graft.runtime.preprocess import image_preprocessor, load_image, text_preprocessor
from graft.format.spec import ImagePreprocess, TextPreprocess
from tests.conftest import BagOfWords, write_word_tokenizer

SPEC = ImagePreprocess(size=16, resize=18, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _reference(img: Image.Image) -> torch.Tensor:
    """Independent NumPy version of resize-shorter-side, centre crop, normalise."""
    w, h = img.size
    scale = 18 / min(w, h)
    size = (max(16, round(w * scale)), max(16, round(h * scale)))
    arr = np.asarray(img.convert("RGB").resize(size, Image.BILINEAR), dtype=np.float64) / 255
    top, left = (size[1] - 16) // 2, (size[0] - 16) // 2
    arr = (arr[top:top + 16, left:left + 16] - 0.5) / 0.5
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float()


def test_image_matches_independent_reference():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    out = image_preprocessor(SPEC, "images")([img, np.asarray(img)])["images"]
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], _reference(img), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=0)


@pytest.mark.parametrize("make", [
    lambda: Image.new("L", (20, 20), 128),                                   # grayscale
    lambda: Image.new("RGBA", (20, 20), (10, 20, 30, 0)),                    # alpha
    lambda: Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)),      # 16-bit
    lambda: Image.new("RGB", (1, 1), (255, 0, 0)),                           # 1x1
    lambda: np.zeros((20, 20), dtype=np.uint8),                              # 2-D array
])
def test_unusual_images_are_converted(make):
    out = image_preprocessor(SPEC, "images")(make())["images"]
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()


def test_sixteen_bit_scaled_by_range():
    img = load_image(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.asarray(img).max() == 255


@pytest.mark.parametrize("bad, match", [
    (None, "does not exist"),
    (np.zeros((4, 4, 7), dtype=np.uint8), "shape"),
    (42, "expected an image"),
    ([], "empty list"),
])
def test_bad_images_give_clear_errors(bad, match, tmp_path):
    with pytest.raises(SignatureError, match=match):
        image_preprocessor(SPEC, "images")(tmp_path / "missing.png" if bad is None else bad)


def test_not_an_image_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(SignatureError, match="not a readable image"):
        load_image(path)


@pytest.fixture
def tokenizer_json(tmp_path):
    return write_word_tokenizer(tmp_path / "tokenizer.json")


def test_text_signature_takes_strings(tokenizer_json, tmp_path):
    torch.manual_seed(0)
    model = BagOfWords()
    graft.save(model, tmp_path / "bow", name="bow", version="1", signatures={
        "embed": graft.Signature(
            inputs={"input_ids": "int64[batch,seq]", "attention_mask": "int64[batch,seq]"},
            preprocess=TextPreprocess("assets/tokenizer.json", max_length=3))},
        assets={"tokenizer.json": tokenizer_json})
    loaded = graft.load(tmp_path / "bow")
    out = loaded(["the cat sat", "dog", "the cat sat on the mat"])
    ids = torch.tensor([[2, 3, 4], [5, 0, 0], [2, 3, 4]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 1]])
    torch.testing.assert_close(out, model(ids, mask), rtol=0, atol=0)
    torch.testing.assert_close(loaded("dog"), model(ids[1:2, :1], mask[1:2, :1]))
    with pytest.raises(SignatureError, match="empty list of strings"):
        loaded([])
    with pytest.raises(SignatureError, match="must be strings"):
        loaded(["ok", 3])


# -- hostile raw inputs -------------------------------------------------------------------------


def _png_declaring(width: int, height: int) -> bytes:
    """A few-byte PNG whose header declares ``width`` x ``height`` pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("width, height, match", [
    (100_000, 100_000, "decompression bomb"),  # 10^10 pixels in ~100 bytes (Pillow refuses)
    (9000, 9000, "9000x9000"),  # under Pillow's own threshold, over Graft's limit
])
def test_a_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch, width, height,
                                                         match):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_declaring(width, height))
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None)
    with pytest.raises(DataError, match=match):
        load_image(path)
    assert decoded == []  # refused from the declared size, before any pixel was decoded


def test_an_image_just_under_the_limit_is_read(tmp_path, monkeypatch):
    from graft.format import limits

    monkeypatch.setattr("graft.runtime.preprocess.MAX_IMAGE_PIXELS", 30 * 40)
    path = tmp_path / "ok.png"
    Image.new("RGB", (40, 30)).save(path)
    assert load_image(path).size == (40, 30)
    Image.new("RGB", (41, 30)).save(path)
    with pytest.raises(DataError, match="41x30"):
        load_image(path)
    assert limits.MAX_IMAGE_PIXELS > 30 * 40


def test_an_extreme_aspect_ratio_cannot_make_the_resize_huge():
    # 1 x 20000: resizing the shorter side to 18 would make it 18 x 360000 (6.5 M pixels).
    spec = ImagePreprocess(size=16, resize=18, mean=(0.5,) * 3, std=(0.5,) * 3)
    import graft.runtime.preprocess as pre

    old = pre.MAX_IMAGE_PIXELS
    pre.MAX_IMAGE_PIXELS = 1_000_000
    try:
        with pytest.raises(DataError, match="resizing"):
            image_preprocessor(spec, "images")(np.zeros((20000, 1), dtype=np.uint8))
    finally:
        pre.MAX_IMAGE_PIXELS = old


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_an_input_that_is_not_a_regular_file_is_refused_without_blocking(kind, tmp_path):
    import os

    path = {"fifo": tmp_path / "in.png", "directory": tmp_path, "device": "/dev/zero"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    with pytest.raises(DataError, match="not a regular file"):
        load_image(path)


def test_tens_of_megabytes_of_text_are_cut_before_tokenising(tokenizer_json):
    spec = TextPreprocess("assets/tokenizer.json", max_length=3)
    run = text_preprocessor(spec, tokenizer_json, ["input_ids", "attention_mask"])
    huge = "the cat sat " * 3_000_000  # 36 MB
    out = run([huge, "dog"])
    torch.testing.assert_close(out["input_ids"], torch.tensor([[2, 3, 4], [5, 0, 0]]))
    # The cut keeps everything truncation keeps: the same as tokenising a short prefix.
    torch.testing.assert_close(out["input_ids"], run([huge[:100], "dog"])["input_ids"])


def test_the_cut_leaves_realistic_text_unchanged(tokenizer_json):
    """Text averaging under 32 characters per token keeps its first max_length tokens."""
    spec = TextPreprocess("assets/tokenizer.json", max_length=4)
    run = text_preprocessor(spec, tokenizer_json, ["input_ids", "attention_mask"])
    long_word = "x" * 30  # 30-character tokens ([UNK]): still under the bound
    text = " ".join([long_word, "cat", long_word, "dog"] * 10)
    torch.testing.assert_close(run(text)["input_ids"], torch.tensor([[1, 3, 1, 5]]))


@pytest.mark.parametrize("content, match", [
    (b"not json at all", "not valid UTF-8 JSON"),
    (b'{"version": "1.0", "model": 5}', "no 'model' object"),
    (b'{"model": {"type": "NoSuchModel"}}', "library can read"),
    (b'{"model": {}, "model": {}}', "twice"),
    (b"\x80\x04K\x01.", "not valid UTF-8 JSON"),
])
def test_a_tokenizer_asset_that_is_not_a_tokenizer_is_a_format_error(content, match, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=match):
        text_preprocessor(TextPreprocess("assets/tokenizer.json", 8), path, ["ids", "mask"])


@pytest.mark.timeout(60)
def test_a_fifo_tokenizer_is_refused_without_blocking(tmp_path):
    import os

    os.mkfifo(tmp_path / "tokenizer.json")
    with pytest.raises(UnsafeContentError, match="FIFO"):
        text_preprocessor(TextPreprocess("assets/tokenizer.json", 8), tmp_path / "tokenizer.json",
                          ["ids", "mask"])


def test_a_module_whose_tokenizer_is_not_one_fails_clearly(tokenizer_json, tmp_path):
    import json as _json

    from graft._fs import sha256_file

    torch.manual_seed(0)
    graft.save(BagOfWords(), tmp_path / "bow", name="bow", version="1", signatures={
        "embed": graft.Signature(
            inputs={"input_ids": "int64[batch,seq]", "attention_mask": "int64[batch,seq]"},
            preprocess=TextPreprocess("assets/tokenizer.json", max_length=3))},
        assets={"tokenizer.json": tokenizer_json})
    asset = tmp_path / "bow" / "assets" / "tokenizer.json"
    asset.write_bytes(b'{"labels": ["a", "b"]}')
    manifest = _json.loads((tmp_path / "bow" / "graft.json").read_text())
    manifest["files"]["assets/tokenizer.json"] = {"sha256": sha256_file(asset),
                                                  "size": asset.stat().st_size}
    (tmp_path / "bow" / "graft.json").write_text(_json.dumps(manifest))
    module = graft.load(tmp_path / "bow")
    with pytest.raises(FormatError, match="tokenizer tokenizer.json is not"):
        module(["the cat"])
