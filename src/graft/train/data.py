"""Training data: labelled map-style datasets, deterministic splits, and collation.

Every dataset here is a map-style ``torch.utils.data.Dataset`` whose items are
``(example, label)``: the example is raw (a PIL image, an image array, a string) unless a
``transform`` turns it into a tensor, and the label is an ``int`` index into ``.classes``.
Each dataset also exposes ``.classes`` (class names) and ``.labels`` (one int per item), so
splitting and stratified sampling never have to load an example.

``module_collate(module, "features")`` turns a batch of raw items into the tensors a
module's signature takes, through the signature's own declarative preprocessing; a user
writes no glue between a folder of images and a hub module.

The Estimator owns shuffling, sampling and batching; this file owns what is in the data.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import numbers
import os
import sys
import time
import warnings
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from graft._extras import require
from graft.errors import DataError, SignatureError

__all__ = [
    "ArrayDataset",
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "LabeledSubset",
    "ModuleCollate",
    "TextTable",
    "classes_of",
    "collate_images",
    "collate_text",
    "content_sha256",
    "example_sha256",
    "few_shot",
    "labels_of",
    "module_collate",
    "module_transform",
    "signature_of",
    "split",
]

#: File name suffixes ``ImageFolder`` treats as images (lower case).
IMAGE_EXTENSIONS = frozenset({
    ".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp",
})

# A file whose modification time is this close to when it was hashed may change again within
# the file system's timestamp granularity, so its cached hash is not trusted (git's "racy"
# entries).
_RACY_NS = 2_000_000_000


# --------------------------------------------------------------------------------------------
# Classes and labels


def _check_classes(classes: Sequence[str], where: str) -> list[str]:
    if isinstance(classes, (str, bytes)):
        raise DataError(f"classes must be a list of class names, got the string {classes!r}; "
                        "write classes=[...]")
    names = list(classes)
    bad = [c for c in names if not isinstance(c, str) or not c]
    if bad:
        raise DataError(f"classes must be non-empty strings, got {bad[0]!r} in {where}")
    seen: set[str] = set()
    dupes = [c for c in names if c in seen or seen.add(c)]  # type: ignore[func-returns-value]
    if dupes:
        raise DataError(f"classes lists {dupes[0]!r} twice in {where}; class names must be "
                        "unique")
    _need_two(names, where)
    return names


def _need_two(classes: Sequence[str], where: str) -> None:
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DataError(f"a classifier needs at least two classes; found {found} in {where}")


def _natural_order(names: Iterable[str]) -> list[str]:
    """Sort class names; all-integer names sort numerically ('2' before '10')."""
    names = sorted(set(names))
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return names


def _first_few(items: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(x) for x in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def labels_of(dataset: Any) -> list[int]:
    """The int label of every item: ``dataset.labels`` when it has them, else by iterating."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [dataset[i][1] for i in range(len(dataset))]
    out = [int(x) for x in labels]
    if len(out) != len(dataset):
        raise DataError(f"dataset has {len(dataset)} items but {len(out)} labels")
    return out


def classes_of(dataset: Any) -> list[str]:
    """``dataset.classes``, or class names '0'..'K-1' from the labels."""
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return list(classes)
    labels = labels_of(dataset)
    return [str(i) for i in range(max(labels) + 1)] if labels else []


# --------------------------------------------------------------------------------------------
# Content fingerprints (the feature cache keys examples by them)


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


# --------------------------------------------------------------------------------------------
# Datasets


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
            self.classes = _natural_order(folders)
        else:
            self.classes = _check_classes(classes, f"ImageFolder({str(self.root)!r})")
            unknown = [f for f in folders if f not in self.classes]
            if unknown:
                raise DataError(f"folder {str(self.root / unknown[0])!r} is not one of the "
                                f"classes {self.classes}; add {unknown[0]!r} to classes or "
                                "move the folder out of " + str(self.root))
        if not folders:
            stray = [p.name for p in self.root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
            hint = (f"; it holds images ({_first_few(sorted(stray), 3)}) but no class folders: "
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
            _need_two(present, f"image folder {self.root}")
            if empty:
                raise DataError(f"class folder(s) {_first_few(empty)} under {self.root} hold no "
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
        sha = _file_sha256(data)
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


def _file_sha256(data: bytes) -> str:
    digest = hashlib.sha256(b"file\0%d\0" % len(data))
    digest.update(data)
    return digest.hexdigest()


def _check_image(path: Path) -> tuple[tuple[int, ...] | None, str | None, str | None]:
    """Read and decode one file: (stat stamp or None, file digest, None) or (.., reason)."""
    image_mod = require("PIL.Image", "image", "ImageFolder")
    try:
        stamp = _stamp(os.stat(path))
        hashed_at = time.time_ns()
        data = path.read_bytes()
    except OSError as exc:
        return None, None, f"cannot read the file ({exc.strerror or exc})"
    if not data:
        return None, None, "the file is empty"
    try:
        with image_mod.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                img.draft("RGB", (1, 1))  # decode at reduced scale: it still reads every byte
            img.load()
            if img.width < 1 or img.height < 1:
                return None, None, f"the image is {img.width}x{img.height}"
    except image_mod.UnidentifiedImageError:
        return None, None, "not an image Pillow can identify (wrong suffix or corrupt header)"
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the file is unusable
        return None, None, f"cannot decode the image ({type(exc).__name__}: {exc})"
    return (None if _racy(stamp, hashed_at) else stamp), _file_sha256(data), None


def _map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int | None) -> list[Any]:
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or len(items) < 8:
        return [fn(item) for item in items]
    # Decoding releases the GIL, so threads overlap; results keep the input order.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="graft-data") as pool:
        return list(pool.map(fn, items, chunksize=16))


class TextTable(Dataset):
    """Labelled strings from a CSV file or a JSON Lines file (chosen by the suffix).

    ``.csv`` (``.tsv`` for tab-separated) needs a header row; ``.jsonl`` / ``.ndjson`` holds
    one JSON object per line. Items are ``(text, label)``.

    Args:
        path: The file.
        text_column: The column (or JSON key) holding the text.
        label_column: The column holding the class name of each row.
        classes: The class names, in label order. ``None``: the distinct labels in the file,
            sorted (numerically when all are integers).

    Raises:
        DataError: the file is missing, empty or malformed; a column is missing (the message
            lists the available ones); a label is not one of ``classes`` (the message names
            the first few and their lines); fewer than two classes.
    """

    def __init__(self, path: str | os.PathLike[str], text_column: str = "text",
                 label_column: str = "label", classes: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self.text_column = text_column
        self.label_column = label_column
        suffix = self.path.suffix.lower()
        if suffix not in (".csv", ".tsv", ".jsonl", ".ndjson"):
            raise DataError(f"TextTable reads .csv, .tsv, .jsonl or .ndjson files, got "
                            f"{self.path.name!r}; rename it or convert it")
        if not self.path.is_file():
            raise DataError(f"text table {self.path} does not exist")
        rows = (self._read_jsonl() if suffix in (".jsonl", ".ndjson")
                else self._read_csv("\t" if suffix == ".tsv" else ","))
        if not rows:
            raise DataError(f"text table {self.path} has no rows; it needs at least one "
                            f"row with {text_column!r} and {label_column!r}")
        self.texts: list[str] = [text for _, text, _ in rows]
        names = [label for _, _, label in rows]
        if classes is None:
            self.classes = _natural_order(names)
            _need_two(self.classes, f"column {label_column!r} of {self.path}")
        else:
            self.classes = _check_classes(classes, f"TextTable({str(self.path)!r})")
        index = {name: i for i, name in enumerate(self.classes)}
        bad = [(line, label) for line, _, label in rows if label not in index]
        if bad:
            shown = ", ".join(f"{label!r} (line {line})" for line, label in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise DataError(f"{self.path}: {len(bad)} rows have labels that are not among the "
                            f"classes {self.classes}: {shown}{more}; fix the labels or add "
                            "them to classes")
        self.labels: list[int] = [index[name] for name in names]
        self.lines: list[int] = [line for line, _, _ in rows]

    def _row(self, record: Mapping[str, Any], line: int,
             columns: Sequence[str]) -> tuple[int, str, str]:
        missing = [c for c in (self.text_column, self.label_column) if c not in record]
        if missing:
            raise DataError(f"{self.path} line {line} has no column {missing[0]!r}; the "
                            f"available columns are {list(columns)}; pass text_column=... "
                            "and label_column=...")
        text, label = record[self.text_column], record[self.label_column]
        if not isinstance(text, str):
            raise DataError(f"{self.path} line {line}: {self.text_column!r} must be a string, "
                            f"got {type(text).__name__} {text!r}"[:300])
        if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
            raise DataError(f"{self.path} line {line}: {self.label_column!r} must be a class "
                            f"name (string or integer), got {label!r}"[:300])
        return line, text, str(label)

    def _read_csv(self, delimiter: str) -> list[tuple[int, str, str]]:
        rows = []
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f, delimiter=delimiter)
                header = next(reader, None)
                if header is None:
                    raise DataError(f"text table {self.path} is empty; it needs a header row "
                                    f"naming the columns {self.text_column!r} and "
                                    f"{self.label_column!r}")
                header = [h.strip() for h in header]
                missing = [c for c in (self.text_column, self.label_column) if c not in header]
                if missing:
                    raise DataError(f"{self.path} has no column {missing[0]!r}; the available "
                                    f"columns are {header}; pass text_column=... and "
                                    "label_column=...")
                for values in reader:
                    line = reader.line_num
                    if not any(v.strip() for v in values):
                        continue  # blank line
                    if len(values) != len(header):
                        raise DataError(f"{self.path} line {line} has {len(values)} fields "
                                        f"but the header has {len(header)} ({header}); quote "
                                        "fields that contain the delimiter")
                    rows.append(self._row(dict(zip(header, values)), line, header))
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.path} is not UTF-8 text ({exc}); re-save it as UTF-8") \
                from None
        except csv.Error as exc:
            raise DataError(f"{self.path} is not valid CSV ({exc})") from None
        return rows

    def _read_jsonl(self) -> list[tuple[int, str, str]]:
        rows = []
        try:
            with open(self.path, encoding="utf-8-sig") as f:
                for line, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    try:
                        record = json.loads(raw)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{self.path} line {line} is not valid JSON "
                                        f"({exc.msg} at column {exc.colno})") from None
                    if not isinstance(record, dict):
                        raise DataError(f"{self.path} line {line} is a JSON "
                                        f"{type(record).__name__}; each line must be an object "
                                        f"like {{\"{self.text_column}\": ..., "
                                        f"\"{self.label_column}\": ...}}")
                    rows.append(self._row(record, line, list(record)))
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.path} is not UTF-8 text ({exc}); re-save it as UTF-8") \
                from None
        return rows

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.texts[index], self.labels[index]

    def __repr__(self) -> str:
        return f"TextTable({str(self.path)!r}, {len(self)} rows, classes={self.classes})"


class ArrayDataset(Dataset):
    """Examples and labels held in memory: arrays, tensors, or lists.

    Args:
        inputs: One example per row: a uint8 image array ``(N, H, W[, C])``, a float tensor
            ``(N, C, H, W)`` (already preprocessed), a list of strings, or any sequence of
            examples (PIL images, arrays, ...).
        labels: ``N`` class indices (ints), or ``N`` class names (strings).
        classes: The class names, in label order. ``None``: for int labels ``'0'`` up to the
            largest label, for string labels the distinct names, sorted.
        transform: Applied to each example before it is returned.

    Raises:
        DataError: lengths differ; no examples; labels that are negative, fractional or not
            among ``classes``; fewer than two classes.
    """

    def __init__(self, inputs: Any, labels: Any, classes: Sequence[str] | None = None, *,
                 transform: Callable[[Any], Any] | None = None) -> None:
        if isinstance(inputs, (str, bytes)):
            raise DataError("inputs must be a sequence of examples, got one string; wrap it "
                            "in a list")
        self.inputs = inputs
        self.transform = transform
        count = len(inputs)
        if count == 0:
            raise DataError("ArrayDataset got no examples; inputs is empty")
        raw = labels.tolist() if isinstance(labels, (np.ndarray, torch.Tensor)) else list(labels)
        if len(raw) != count:
            raise DataError(f"ArrayDataset got {count} inputs but {len(raw)} labels; give one "
                            "label per example")
        if all(isinstance(x, str) for x in raw):
            names = raw
            self.classes = (_natural_order(names) if classes is None
                            else _check_classes(classes, "ArrayDataset"))
            index = {name: i for i, name in enumerate(self.classes)}
            bad = [(i, x) for i, x in enumerate(names) if x not in index]
            if bad:
                shown = ", ".join(f"{x!r} (item {i})" for i, x in bad[:5])
                raise DataError(f"{len(bad)} labels are not among the classes {self.classes}: "
                                f"{shown}")
            self.labels = [index[x] for x in names]
        else:
            self.labels = [_int_label(x, i) for i, x in enumerate(raw)]
            top = max(self.labels)
            if classes is None:
                self.classes = [str(i) for i in range(top + 1)]
            else:
                self.classes = _check_classes(classes, "ArrayDataset")
                if top >= len(self.classes):
                    raise DataError(f"label {top} is out of range for {len(self.classes)} "
                                    f"classes {self.classes}; labels must be 0 to "
                                    f"{len(self.classes) - 1}")
        _need_two(self.classes, "ArrayDataset labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        example = self.inputs[index]
        return (self.transform(example) if self.transform else example), self.labels[index]

    def fingerprint(self, index: int) -> str | None:
        return None if self.transform is not None else content_sha256(self.inputs[index])

    def __repr__(self) -> str:
        return f"ArrayDataset({len(self)} examples, classes={self.classes})"


def _int_label(value: Any, position: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise DataError(f"label {position} is {value!r}; labels must all be class indices "
                        "(ints) or all class names (strings)")
    if float(value) != int(value) or value < 0:
        raise DataError(f"label {position} is {value!r}; class indices must be whole numbers "
                        ">= 0")
    return int(value)


class LabeledSubset(Subset):
    """A ``Subset`` that keeps its parent's ``.classes`` and its items' ``.labels``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        super().__init__(dataset, list(indices))
        self.classes: list[str] = classes_of(dataset)
        parent = labels_of(dataset)
        self.labels: list[int] = [parent[i] for i in self.indices]

    def fingerprint(self, index: int) -> str:
        return example_sha256(self.dataset, self.indices[index])

    def __repr__(self) -> str:
        return f"LabeledSubset({len(self)} of {len(self.dataset)}, classes={self.classes})"


# --------------------------------------------------------------------------------------------
# Splitting


def _order(indices: Sequence[int], seed: int, salt: str) -> list[int]:
    """A fixed pseudo-random order of ``indices``: the same on every machine and version."""
    def key(i: int) -> bytes:
        return hashlib.blake2b(f"{seed}\0{salt}\0{i}".encode(), digest_size=8).digest()
    return sorted(indices, key=key)


def _by_class(labels: Sequence[int], classes: int) -> list[list[int]]:
    groups: list[list[int]] = [[] for _ in range(classes)]
    for i, label in enumerate(labels):
        groups[label].append(i)
    return groups


def split(dataset: Dataset, validation: float | int = 0.2, seed: int = 0,
          stratify: bool = True) -> tuple[LabeledSubset, LabeledSubset]:
    """Split a dataset into training and validation subsets, deterministically.

    The two subsets are disjoint, cover the dataset, and keep ``.classes`` and ``.labels``.
    Stratified (the default), each class gives the same share of its examples to validation
    (rounded so the total is right), and every class keeps at least one training example.
    The same ``seed`` gives the same split on every run and machine.

    Args:
        dataset: A labelled dataset (``.labels``, or items ``(example, label)``).
        validation: The share of examples for validation, in (0, 1), or their number.
        seed: Chooses the split.
        stratify: Keep class proportions in both subsets.

    Returns:
        ``(train, validation)``, each listing its items in the dataset's order.

    Raises:
        DataError: ``validation`` is out of range, or the dataset is too small to split.
    """
    labels = labels_of(dataset)
    total = len(labels)
    if total < 2:
        raise DataError(f"cannot split a dataset of {total} example(s); it needs at least 2")
    if isinstance(validation, bool) or not isinstance(validation, numbers.Real):
        raise DataError(f"validation must be a fraction in (0, 1) or a count, got "
                        f"{validation!r}")
    if not isinstance(validation, numbers.Integral):
        if not 0.0 < validation < 1.0:
            raise DataError(f"validation={validation} must be a fraction between 0 and 1 "
                            "(exclusive), e.g. 0.2, or a whole number of examples")
        wanted = min(max(round(total * validation), 1), total - 1)
    else:
        if not 1 <= validation < total:
            raise DataError(f"validation={validation} examples is out of range for a dataset "
                            f"of {total}; give 1 to {total - 1}")
        wanted = int(validation)

    if not stratify:
        val = _order(range(total), seed, "split")[:wanted]
    else:
        groups = _by_class(labels, max(len(classes_of(dataset)), max(labels) + 1))
        quota = [len(g) * wanted / total for g in groups]
        # Each class keeps at least one training example.
        take = [min(int(q), max(len(g) - 1, 0)) for q, g in zip(quota, groups)]
        # Hand out the remainder by largest fractional share (ties: lower class first).
        for c in sorted(range(len(groups)), key=lambda c: (-(quota[c] - int(quota[c])), c)):
            if sum(take) >= wanted:
                break
            if take[c] < len(groups[c]) - 1:
                take[c] += 1
        val = [i for c, g in enumerate(groups) for i in _order(g, seed, f"class{c}")[:take[c]]]
        if not val:
            raise DataError(f"validation={validation} leaves no validation example: every "
                            "class has a single example; use more data or stratify=False")
    chosen = set(val)
    return (LabeledSubset(dataset, [i for i in range(total) if i not in chosen]),
            LabeledSubset(dataset, sorted(chosen)))


def few_shot(dataset: Dataset, per_class: int,
             seed: int = 0) -> tuple[LabeledSubset, LabeledSubset]:
    """Pick ``per_class`` training examples of every class; the rest are for evaluation.

    Args:
        dataset: A labelled dataset.
        per_class: Examples per class in the training subset.
        seed: Chooses the examples, the same on every run and machine.

    Returns:
        ``(train, rest)``: ``len(classes) * per_class`` examples, and all others.

    Raises:
        DataError: ``per_class`` < 1, or a class has fewer than ``per_class`` examples.
    """
    if isinstance(per_class, bool) or not isinstance(per_class, numbers.Integral) \
            or per_class < 1:
        raise DataError(f"per_class must be a whole number >= 1, got {per_class!r}")
    labels = labels_of(dataset)
    classes = classes_of(dataset)
    classes += [str(i) for i in range(len(classes), max(labels, default=-1) + 1)]
    groups = _by_class(labels, len(classes))
    short = [(classes[c], len(g)) for c, g in enumerate(groups) if len(g) < per_class]
    if short:
        shown = ", ".join(f"{name!r} has {n}" for name, n in short[:5])
        raise DataError(f"few_shot(per_class={per_class}) needs {per_class} examples of every "
                        f"class, but {shown}; lower per_class or add examples")
    train = {i for c, g in enumerate(groups) for i in _order(g, seed, f"class{c}")[:per_class]}
    return (LabeledSubset(dataset, sorted(train)),
            LabeledSubset(dataset, [i for i in range(len(labels)) if i not in train]))


# --------------------------------------------------------------------------------------------
# Collation: raw items -> the tensors a signature takes


class ModuleCollate:
    """Turns a batch of ``(example, label)`` items into ``(inputs, labels)`` for a signature.

    Raw examples (images, image arrays, paths, strings) go through the signature's declarative
    preprocessing; tensors are stacked as they are. ``inputs`` is one tensor for a one-input
    signature (images), else a dict input name -> tensor (text: token ids, attention mask);
    ``labels`` is int64 ``(B,)``. Built by ``module_collate``; it pickles, so it works in
    ``DataLoader`` worker processes.
    """

    def __init__(self, input_names: Sequence[str], preprocess: Any = None,
                 tokenizer_path: str | os.PathLike[str] | None = None) -> None:
        from graft.format.spec import ImagePreprocess, TextPreprocess

        self.input_names = list(input_names)
        self.preprocess = preprocess
        self.tokenizer_path = None if tokenizer_path is None else Path(tokenizer_path)
        if isinstance(preprocess, TextPreprocess) and self.tokenizer_path is None:
            raise DataError("text preprocessing needs the tokenizer file; pass tokenizer_path")
        if preprocess is not None and not isinstance(preprocess, (ImagePreprocess,
                                                                  TextPreprocess)):
            raise DataError(f"preprocess must be an ImagePreprocess or TextPreprocess, got "
                            f"{type(preprocess).__name__}")
        self._fn: Callable[[Any], dict[str, torch.Tensor]] | None = None

    @property
    def kind(self) -> str | None:
        """``"image"``, ``"text"``, or ``None`` when examples must already be tensors."""
        return None if self.preprocess is None else self.preprocess.kind

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fn"] = None  # rebuilt in the worker
        return state

    def _preprocessor(self) -> Callable[[Any], dict[str, torch.Tensor]]:
        if self._fn is None:
            from graft.runtime import preprocess as pre

            if self.kind == "image":
                self._fn = pre.image_preprocessor(self.preprocess, self.input_names[0])
            else:
                self._fn = pre.text_preprocessor(self.preprocess, self.tokenizer_path,
                                                 self.input_names)
        return self._fn

    def one(self, example: Any) -> torch.Tensor:
        """One image example as the ``(3, size, size)`` tensor the signature takes."""
        if isinstance(example, torch.Tensor):
            return example
        if self.kind != "image":
            raise DataError(f"example is a {type(example).__name__}, but this signature "
                            + ("takes text in batches; use inputs(examples)" if self.kind
                               else "has no preprocessing: give tensors (use a transform)"))
        try:
            return self._preprocessor()([example])[self.input_names[0]][0]
        except SignatureError as exc:
            raise DataError(f"cannot preprocess an example: {exc}") from None

    def inputs(self, examples: Sequence[Any],
               executor: Executor | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """The batched inputs for ``examples``; image decoding runs on ``executor`` if given."""
        if not examples:
            raise DataError("cannot collate an empty batch")
        first = examples[0]
        if isinstance(first, Mapping):
            return {k: _stack([e[k] for e in examples], k) for k in first}
        if isinstance(first, torch.Tensor) or self.kind == "image":
            tensors = (list(executor.map(self.one, examples)) if executor is not None
                       else [self.one(e) for e in examples])
            return _stack(tensors, self.input_names[0])
        if self.kind == "text":
            try:
                out = self._preprocessor()(list(examples))
            except SignatureError as exc:
                raise DataError(f"cannot preprocess a batch of text: {exc}") from None
            return out
        raise DataError(f"example is a {type(first).__name__}, but the signature has no "
                        "preprocessing; give tensors (use a transform)")

    def __call__(self, batch: Sequence[tuple[Any, Any]]) -> tuple[Any, torch.Tensor]:
        if not batch:
            raise DataError("cannot collate an empty batch")
        examples = [item[0] for item in batch]
        labels = torch.as_tensor([int(item[1]) for item in batch], dtype=torch.int64)
        return self.inputs(examples), labels

    def __repr__(self) -> str:
        return f"ModuleCollate(inputs={self.input_names}, preprocess={self.preprocess!r})"


def _stack(tensors: Sequence[Any], name: str) -> torch.Tensor:
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        kinds = sorted({type(t).__name__ for t in tensors})
        raise DataError(f"input {name!r}: a batch mixes example kinds {kinds}; make every "
                        "example the same kind")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise DataError(f"input {name!r}: examples have different shapes "
                        f"{_first_few(sorted(shapes), 3)}; resize or pad them to one shape")
    return torch.stack(list(tensors))


def signature_of(module: Any, signature: str | None = None) -> tuple[Any, str, Any]:
    """``(graft.Module, signature name, SignatureSpec)`` from a module or a signature view.

    Raises:
        SignatureError: the module has no such signature.
    """
    from graft.runtime.module import BoundSignature

    if isinstance(module, BoundSignature):
        if signature is not None and signature != module.name:
            raise DataError(f"got the signature view {module.name!r} and signature="
                            f"{signature!r}; give one of them")
        module, signature = module.module, module.name
    name = signature or module.default_signature
    module.signature(name)  # a clear SignatureError for an unknown name
    return module, name, module.signatures[name]


def module_collate(module: Any, signature: str | None = None) -> ModuleCollate:
    """A ``DataLoader`` ``collate_fn`` that prepares raw items for a module's signature.

    Args:
        module: A ``graft.Module``, or one of its signature views (``module.signature(...)``).
        signature: The signature's name (``None``: the view's, or the module's default).

    Returns:
        ``collate(batch) -> (inputs, labels)``: ``inputs`` is a tensor for one-input signatures
        (images ``(B, 3, S, S)``), else a dict input name -> tensor (text: token ids and
        attention mask, int64 ``(B, T)``); ``labels`` is int64 ``(B,)``.
    """
    from graft.format.spec import TextPreprocess

    module, _, spec = signature_of(module, signature)
    tokenizer = None
    if isinstance(spec.preprocess, TextPreprocess):
        tokenizer = module.asset_path(spec.preprocess.tokenizer.removeprefix("assets/"))
    return ModuleCollate(list(spec.inputs), spec.preprocess, tokenizer)


def module_transform(module: Any, signature: str | None = None) -> Callable[[Any], torch.Tensor]:
    """A per-example transform (e.g. for ``ImageFolder``): image -> ``(3, S, S)`` tensor."""
    from graft.format.spec import ImagePreprocess

    _, name, spec = signature_of(module, signature)
    if not isinstance(spec.preprocess, ImagePreprocess):
        raise DataError(f"signature {name!r} has no image preprocessing, so there is no "
                        "per-example transform; use module_collate(module, signature) for "
                        "text, or give tensors")
    return ModuleCollate(list(spec.inputs), spec.preprocess).one


def collate_images(preprocess: Any, input_name: str = "images") -> ModuleCollate:
    """A collate function for images under an ``ImagePreprocess`` (no module needed)."""
    return ModuleCollate([input_name], preprocess)


def collate_text(tokenizer_path: str | os.PathLike[str], max_length: int = 128,
                 input_names: Sequence[str] = ("input_ids", "attention_mask")) -> ModuleCollate:
    """A collate function for strings through a ``tokenizer.json`` file (no module needed)."""
    from graft.format.spec import TextPreprocess

    return ModuleCollate(list(input_names), TextPreprocess("assets/tokenizer.json", max_length),
                         tokenizer_path)
