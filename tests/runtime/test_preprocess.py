"""Declarative preprocessing turns raw images and strings into the signature's tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import graft
from graft.errors import SignatureError
from graft.runtime.preprocess import image_preprocessor, load_image
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
