"""Content fingerprints: the sha256 of what an example holds, not of the object holding it.

The feature cache keys examples by these digests, so the same image read twice, or a string
in two datasets, is computed once. A tag per kind keeps a string from colliding with bytes
that happen to be equal.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Any, Mapping

import numpy as np
import torch

from graft.errors import DataError

__all__ = ["content_sha256", "example_sha256", "file_sha256"]


def content_sha256(example: Any) -> str:
    """The sha256 of an example's content: the UTF-8 text, or an image's or tensor's pixels.

    Two examples with the same content have the same digest whatever object holds them;
    a tag per kind keeps a string from colliding with bytes that happen to be equal.

    Raises:
        DataError: the example is of a kind that has no content digest.
    """
    digest = hashlib.sha256()
    _feed(digest, example)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, str):
        data = value.encode("utf-8")
        digest.update(b"text\0%d\0" % len(data))
        digest.update(data)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        digest.update(b"bytes\0%d\0" % len(value))
        digest.update(value)
    elif isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        digest.update(f"tensor\0{value.dtype}\0{tuple(value.shape)}\0".encode())
        # A byte view works for every dtype (bfloat16 has no NumPy equivalent).
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        value = np.ascontiguousarray(value)
        digest.update(f"array\0{value.dtype.str}\0{value.shape}\0".encode())
        digest.update(value.tobytes())
    elif isinstance(value, Mapping):
        digest.update(b"dict\0%d\0" % len(value))
        for key in sorted(value):
            _feed(digest, str(key))
            _feed(digest, value[key])
    elif _is_pil_image(value):
        digest.update(f"image\0{value.mode}\0{value.size}\0".encode())
        digest.update(value.tobytes())
    else:
        raise DataError(f"cannot compute a content digest of a {type(value).__name__} example; "
                        "examples must be strings, images, arrays or tensors")


def _is_pil_image(value: Any) -> bool:
    image_mod = sys.modules.get("PIL.Image")  # no PIL loaded: the value cannot be an image
    return image_mod is not None and isinstance(value, image_mod.Image)


def example_sha256(dataset: Any, index: int) -> str:
    """The content digest of item ``index`` of ``dataset``.

    ``dataset.fingerprint(index)`` when the dataset has one (an ``ImageFolder`` hashes the
    file's bytes without decoding it), else ``content_sha256`` of the example.
    """
    method = getattr(dataset, "fingerprint", None)
    if method is not None:
        found = method(index)
        if found is not None:
            return found
    return content_sha256(dataset[index][0])


def file_sha256(data: bytes) -> str:
    """The fingerprint of a file's bytes (tagged, so it never equals a text's or tensor's)."""
    digest = hashlib.sha256(b"file\0%d\0" % len(data))
    digest.update(data)
    return digest.hexdigest()
