"""Argument checks the training files share (user input is checked where it enters)."""

from __future__ import annotations

__all__ = ["check_int"]


def check_int(name: str, value: object, minimum: int, fix: str) -> int:
    """``value`` if it is an int >= ``minimum``.

    Raises:
        ValueError: naming the argument, what it got, and ``fix``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {expected}; got {type(value).__name__} "
                         f"{value!r}. {fix}")
    return value
