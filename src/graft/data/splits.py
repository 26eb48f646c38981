"""Deterministic splits: train/validation (stratified) and few-shot subsets.

Both return :class:`LabeledSubset` objects, which keep the parent's ``.classes`` and their items'
``.labels``. The order is a keyed hash of the index, so the same seed gives the same split on
every run, machine and version.
"""

from __future__ import annotations

import hashlib
import numbers
from typing import Sequence

from torch.utils.data import Dataset, Subset

from graft.data.fingerprints import example_sha256
from graft.data.labels import classes_of, labels_of
from graft.errors import DataError

__all__ = ["LabeledSubset", "few_shot", "split"]


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
