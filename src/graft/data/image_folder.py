"""``ImageFolder``: images in one sub-folder per class, each checked once when it is listed."""

from __future__ import annotations

import io
import os
import stat
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from graft._extras import require
from graft.data.fingerprints import file_sha256
from graft.data.labels import check_classes, first_few, natural_order, need_two
from graft.errors import DataError, SignatureError
from graft.format.limits import MAX_IMAGE_PIXELS

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder"]

#: File name suffixes ``ImageFolder`` treats as images (lower case).
IMAGE_EXTENSIONS = frozenset({
    ".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp",
})

# A file whose modification time is this close to when it was hashed may change again within
# the file system's timestamp granularity, so its cached hash is not trusted (git's "racy"
# entries).
_RACY_NS = 2_000_000_000


class ImageFolder(Dataset):
    """Images in one sub-folder per class: ``root/cats/1.jpg``, ``root/dogs/a.png``, ...

    Every file with an image suffix (``IMAGE_EXTENSIONS``, any case, in nested folders too) is
    opened and decoded once here, so that a truncated JPEG or a text file named ``.png`` is
    found now, not in the middle of training. Such files are listed in ``.skipped`` with the
    reason and announced by a warning; they are never dropped silently. Files with other
    suffixes and hidden files are ignored.

    Args:
        root: The folder that holds one sub-folder per class.
        classes: The class names, in label order. ``None``: the sub-folders' names, sorted
            (numerically when all are integers). When given, a sub-folder not in ``classes`` is
            an error, and a class may have no folder (a validation set that lacks one).
        transform: Applied to each RGB ``PIL.Image`` before it is returned, e.g.
            ``module_transform(module, "features")``. ``None``: items are PIL images.
        workers: Threads that check files at construction (``None``: up to 8).

    Raises:
        DataError: ``root`` is missing or holds no images; fewer than two classes; a
            sub-folder not in ``classes``; a class folder without any readable image.
    """

    def __init__(self, root: str | os.PathLike[str], classes: Sequence[str] | None = None, *,
                 transform: Callable[[Any], Any] | None = None,
                 workers: int | None = None) -> None:
        self.root = Path(root)
        self.transform = transform
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist or is not a directory; "
                            "give a folder with one sub-folder of images per class")
        folders = sorted(p.name for p in self.root.iterdir()
                         if p.is_dir() and not p.name.startswith("."))
        if classes is None:
            self.classes = natural_order(folders)
        else:
            self.classes = check_classes(classes, f"ImageFolder({str(self.root)!r})")
            unknown = [f for f in folders if f not in self.classes]
            if unknown:
                raise DataError(f"folder {str(self.root / unknown[0])!r} is not one of the "
                                f"classes {self.classes}; add {unknown[0]!r} to classes or "
                                "move the folder out of " + str(self.root))
        if not folders:
            stray = [p.name for p in self.root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
            hint = (f"; it holds images ({first_few(sorted(stray), 3)}) but no class folders: "
                    "move each class's images into a sub-folder named after it") if stray else ""
            raise DataError(f"image folder {self.root} has no class sub-folders{hint}")

        candidates: list[tuple[Path, int]] = []
        self.ignored: list[Path] = []  # files without an image suffix
        for label, name in enumerate(self.classes):
            folder = self.root / name
            if folder.is_dir():
                for path in _walk(folder):
                    if path.suffix.lower() in IMAGE_EXTENSIONS:
                        candidates.append((path, label))
                    else:
                        self.ignored.append(path)
        if not candidates:
            raise DataError(f"image folder {self.root} holds no image files (suffixes "
                            f"{sorted(IMAGE_EXTENSIONS)}) in its class folders {folders}")

        checked = _map(_check_image, [p for p, _ in candidates], workers)
        self.samples: list[tuple[Path, int]] = []
        self.skipped: list[tuple[Path, str]] = []
        self._hashes: dict[Path, tuple[tuple[int, ...], str]] = {}
        for (path, label), (stamp, sha, reason) in zip(candidates, checked):
            if reason is not None:
                self.skipped.append((path, reason))
            else:
                self.samples.append((path, label))
                if stamp is not None:
                    self._hashes[path] = (stamp, sha)
        self.labels: list[int] = [label for _, label in self.samples]

        if self.skipped:
            path, reason = self.skipped[0]
            warnings.warn(f"ImageFolder skipped {len(self.skipped)} of {len(candidates)} image "
                          f"files under {self.root} that cannot be read (first: {path}: "
                          f"{reason}); the list is in dataset.skipped", UserWarning, stacklevel=2)
        if not self.samples:
            raise DataError(f"image folder {self.root} has no readable images: all "
                            f"{len(candidates)} image files failed to open (first: "
                            f"{self.skipped[0][0]}: {self.skipped[0][1]})")
        if classes is None:
            counts = np.bincount(self.labels, minlength=len(self.classes))
            empty = [self.classes[i] for i in np.flatnonzero(counts == 0)]
            present = [self.classes[i] for i in np.flatnonzero(counts)]
            need_two(present, f"image folder {self.root}")
            if empty:
                raise DataError(f"class folder(s) {first_few(empty)} under {self.root} hold no "
                                "readable images; add images or remove the folder")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from graft.runtime.preprocess import load_image

        path, label = self.samples[index]
        try:
            image = load_image(path)
        except SignatureError as exc:
            raise DataError(f"image {path} could not be read, though it could when the dataset "
                            f"was built ({exc}); was it changed or removed?") from None
        return (self.transform(image) if self.transform else image), label

    def fingerprint(self, index: int) -> str | None:
        """The sha256 of item ``index``'s file bytes (``None`` when a transform is set).

        Reuses the hash taken at construction while the file's size and timestamps are
        unchanged, so a second pass over a dataset reads no image.
        """
        if self.transform is not None:
            return None  # the item is what the transform makes of the file
        path = self.samples[index][0]
        cached = self._hashes.get(path)
        try:
            stamp = _stamp(os.stat(path))
        except OSError as exc:
            raise DataError(f"image {path} is no longer readable ({exc})") from None
        if cached is not None and cached[0] == stamp:
            return cached[1]
        data = path.read_bytes()
        sha = file_sha256(data)
        if not _racy(stamp, time.time_ns()):
            self._hashes[path] = (stamp, sha)
        return sha

    def __repr__(self) -> str:
        return (f"ImageFolder({str(self.root)!r}, {len(self)} images, classes={self.classes}, "
                f"skipped={len(self.skipped)})")


def _walk(folder: Path) -> list[Path]:
    """Files under ``folder`` in a fixed order, skipping hidden files and folders."""
    found = []
    for base, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(base) / f for f in sorted(files) if not f.startswith("."))
    return found


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _racy(stamp: tuple[int, ...], hashed_at_ns: int) -> bool:
    return hashed_at_ns - max(stamp[1], stamp[2]) < _RACY_NS


def _check_image(path: Path) -> tuple[tuple[int, ...] | None, str | None, str | None]:
    """Read and decode one file: (stat stamp or None, file digest, None) or (.., reason)."""
    image_mod = require("PIL.Image", "image", "ImageFolder")
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            # A FIFO would block the read forever, a device could be read forever.
            return None, None, "not a regular file (a FIFO, device or socket)"
        stamp = _stamp(info)
        hashed_at = time.time_ns()
        data = path.read_bytes()
    except OSError as exc:
        return None, None, f"cannot read the file ({exc.strerror or exc})"
    if not data:
        return None, None, "the file is empty"
    try:
        with image_mod.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:  # checked before decoding
                return None, None, (f"it declares {img.width}x{img.height} pixels, over the "
                                    f"limit of {MAX_IMAGE_PIXELS} (a decompression bomb?)")
            if img.format == "JPEG":
                img.draft("RGB", (1, 1))  # decode at reduced scale: it still reads every byte
            img.load()
            if img.width < 1 or img.height < 1:
                return None, None, f"the image is {img.width}x{img.height}"
    except image_mod.UnidentifiedImageError:
        return None, None, "not an image Pillow can identify (wrong suffix or corrupt header)"
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the file is unusable
        return None, None, f"cannot decode the image ({type(exc).__name__}: {exc})"
    return (None if _racy(stamp, hashed_at) else stamp), file_sha256(data), None


def _map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int | None) -> list[Any]:
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or len(items) < 8:
        return [fn(item) for item in items]
    # Decoding releases the GIL, so threads overlap; results keep the input order.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="graft-data") as pool:
        return list(pool.map(fn, items, chunksize=16))
