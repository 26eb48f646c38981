"""``ArrayDataset``: labelled examples held in memory (arrays, tensors or lists)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from graft.data.fingerprints import content_sha256
from graft.data.labels import check_classes, natural_order, need_two
from graft.errors import DataError

__all__ = ["ArrayDataset"]


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
            self.classes = (natural_order(names) if classes is None
                            else check_classes(classes, "ArrayDataset"))
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
                self.classes = check_classes(classes, "ArrayDataset")
                if top >= len(self.classes):
                    raise DataError(f"label {top} is out of range for {len(self.classes)} "
                                    f"classes {self.classes}; labels must be 0 to "
                                    f"{len(self.classes) - 1}")
        need_two(self.classes, "ArrayDataset labels")

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
