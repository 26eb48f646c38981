"""Declarative preprocessing: raw images and strings -> the tensors a signature takes.

Raw inputs are untrusted as much as modules are, and the work they can ask for is bounded
(``graft.format.limits``): an image file must be a regular file (a FIFO would block the read
forever) whose declared size is checked before it is decoded (a few-kilobyte PNG can declare
a gigapixel image); a resize that an extreme aspect ratio would make huge is refused; a string
is cut before it is tokenised, so memory stays bounded for a text of any length; and a
tokenizer asset is read as strict JSON before the tokenizers library parses it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from graft._extras import require
from graft.errors import DataError, FormatError, SignatureError, UnsafeContentError
from graft.format import jsonio
from graft.format.files import open_regular, read_regular
from graft.format.limits import MAX_IMAGE_PIXELS, MAX_TEXT_CHARS_PER_TOKEN, MAX_TOKENIZER_BYTES
from graft.format.spec import ImagePreprocess, TextPreprocess

__all__ = ["image_preprocessor", "load_image", "text_preprocessor"]

Preprocessor = Callable[[Any], dict[str, torch.Tensor]]


def load_image(source: Any) -> Any:
    """Open ``source`` (a path, PIL image or array) as an RGB ``PIL.Image``.

    Grayscale, palette, RGBA and 16-bit images are converted; anything else is a
    ``SignatureError`` saying what was received.
    """
    image_mod = require("PIL.Image", "image", "Image preprocessing")
    if isinstance(source, (str, os.PathLike)):
        source = _read_image_file(Path(source), image_mod)
    if isinstance(source, np.ndarray):
        source = _array_to_image(source, image_mod)
    if not isinstance(source, image_mod.Image):
        raise SignatureError(f"expected an image (PIL image, uint8 array or path), got "
                             f"{type(source).__name__}")
    if source.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        source = _array_to_image(np.asarray(source), image_mod)
    if source.width < 1 or source.height < 1:
        raise SignatureError(f"image is {source.width}x{source.height}; it must be at least "
                             "1x1")
    return source.convert("RGB")


def _read_image_file(path: Path, image_mod: Any) -> Any:
    """Decode an image file, refusing non-regular files and decompression bombs."""
    try:
        stream = open_regular(path, what=f"image file {path}")
    except (FileNotFoundError, NotADirectoryError):
        raise SignatureError(f"image file {path} does not exist") from None
    except UnsafeContentError as exc:
        raise DataError(f"{exc}; give the path of an image file") from None
    with stream, warnings.catch_warnings():
        # Pillow warns past its own threshold; the limit below is lower and raises instead.
        warnings.simplefilter("ignore", image_mod.DecompressionBombWarning)
        try:
            with image_mod.open(stream) as img:
                _check_pixels(img.width, img.height, f"image file {path} declares")
                img.load()
                return img.copy()
        except DataError:
            raise
        except image_mod.DecompressionBombError as exc:
            raise DataError(f"image file {path} is refused: {exc}") from None
        except (image_mod.UnidentifiedImageError, OSError, ValueError, SyntaxError,
                EOFError) as exc:
            raise SignatureError(f"{path} is not a readable image ({exc}); give a PNG, JPEG or "
                                 "other format Pillow reads") from None


def _check_pixels(width: int, height: int, what: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"{what} {width}x{height} pixels, over the limit of "
                        f"{MAX_IMAGE_PIXELS} (graft.format.limits.MAX_IMAGE_PIXELS); downscale "
                        "it first (a small file can declare a huge image: a decompression "
                        "bomb)")


def _array_to_image(array: np.ndarray, image_mod: Any) -> Any:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise SignatureError(f"image array has shape {array.shape}; expected (H, W), (H, W, 3) "
                             "or (H, W, 4)")
    if array.dtype != np.uint8:
        if array.dtype.kind in "ui":
            # Scale integer images by their type's range (16-bit PNGs, ...).
            array = (array.astype(np.float64) / np.iinfo(array.dtype).max * 255.0)
        elif array.dtype.kind == "f":
            array = np.clip(array, 0.0, 1.0) * 255.0
        elif array.dtype.kind == "b":
            array = array.astype(np.float64) * 255.0
        else:
            raise SignatureError(f"image array dtype {array.dtype} is not an image type")
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return image_mod.fromarray(np.ascontiguousarray(array))


def image_preprocessor(spec: ImagePreprocess, input_name: str) -> Preprocessor:
    """A function: image or list of images -> ``{input_name: float32 (B, 3, size, size)}``."""
    image_mod = require("PIL.Image", "image", "Image preprocessing")
    resample = {"bilinear": image_mod.BILINEAR, "bicubic": image_mod.BICUBIC,
                "nearest": image_mod.NEAREST}[spec.interpolation]
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)

    def one(source: Any) -> torch.Tensor:
        img = load_image(source)
        scale = spec.resize / min(img.width, img.height)
        size = (max(spec.size, round(img.width * scale)), max(spec.size, round(img.height * scale)))
        _check_pixels(*size, f"resizing a {img.width}x{img.height} image gives")
        img = img.resize(size, resample)
        left, top = (size[0] - spec.size) // 2, (size[1] - spec.size) // 2
        img = img.crop((left, top, left + spec.size, top + spec.size))
        pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (H, W, 3)
        chw = pixels.permute(2, 0, 1).float() / 255.0  # (3, H, W)
        return (chw - mean) / std

    def run(data: Any) -> dict[str, torch.Tensor]:
        items = list(data) if isinstance(data, (list, tuple)) else [data]
        if not items:
            raise SignatureError("got an empty list of images; pass at least one")
        return {input_name: torch.stack([one(item) for item in items])}

    return run


def _read_tokenizer(path: Path, tokenizers: Any) -> Any:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json``, or a FormatError saying why not."""
    what = f"tokenizer {path.name}"
    try:
        raw = read_regular(path, what=what, max_bytes=MAX_TOKENIZER_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        raise FormatError(f"{what} does not exist at {path}") from None
    data = jsonio.loads(raw, what=what, max_bytes=MAX_TOKENIZER_BYTES)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise FormatError(f"{what} is not a Hugging Face tokenizers JSON file (it has no "
                          "'model' object); save one with `tokenizer.save('tokenizer.json')`")
    try:
        return tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise FormatError(f"{what} is not a tokenizer the tokenizers library can read "
                          f"({str(exc)[:200]}); save one with `tokenizer.save('tokenizer.json')`"
                          ) from None


def text_preprocessor(spec: TextPreprocess, tokenizer_path: Path,
                      input_names: Sequence[str]) -> Preprocessor:
    """A function: string or list of strings -> token ids and attention mask (int64, (B, T))."""
    tokenizers = require("tokenizers", "text", "Text preprocessing")
    tokenizer = _read_tokenizer(Path(tokenizer_path), tokenizers)
    tokenizer.enable_truncation(max_length=spec.max_length)
    # Truncation keeps max_length tokens; cutting the string first keeps tokenising bounded.
    max_chars = spec.max_length * MAX_TEXT_CHARS_PER_TOKEN
    padding = tokenizer.padding or {}
    tokenizer.enable_padding(pad_id=padding.get("pad_id", 0),
                             pad_token=padding.get("pad_token", "[PAD]"))
    if len(input_names) < 2:
        raise SignatureError("text preprocessing needs a signature with two inputs "
                             f"(token ids, attention mask), got {list(input_names)}")
    ids_name, mask_name = input_names[0], input_names[1]

    def run(data: Any) -> dict[str, torch.Tensor]:
        texts = [data] if isinstance(data, str) else list(data)
        if not texts:
            raise SignatureError("got an empty list of strings; pass at least one string")
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise SignatureError(f"text input must be strings, got {bad[0]}")
        encodings = tokenizer.encode_batch([t[:max_chars] for t in texts])
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
        return {ids_name: ids, mask_name: mask}

    return run
