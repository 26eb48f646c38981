"""Class names and labels of a dataset, read without loading a single example.

Every Graft dataset exposes ``.classes`` (class names, in label order) and ``.labels`` (one int
per item); these helpers read them from any dataset and check class lists where they enter.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from graft.errors import DataError

__all__ = ["check_classes", "classes_of", "first_few", "labels_of", "natural_order",
           "need_two"]


def check_classes(classes: Sequence[str], where: str) -> list[str]:
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
    need_two(names, where)
    return names


def need_two(classes: Sequence[str], where: str) -> None:
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DataError(f"a classifier needs at least two classes; found {found} in {where}")


def natural_order(names: Iterable[str]) -> list[str]:
    """Sort class names; all-integer names sort numerically ('2' before '10')."""
    names = sorted(set(names))
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return names


def first_few(items: Sequence[Any], limit: int = 5) -> str:
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
