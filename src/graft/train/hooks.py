"""Callbacks: code of the user's that the Estimator runs on each step, evaluation and checkpoint.

Subclass :class:`Callback` and override the hooks you need; pass instances as
``Estimator(callbacks=[...])``. Every worker calls every hook, in the order the callbacks
were given. A hook may call ``estimator.request_stop()`` to end training after the current
step (a checkpoint is written; every worker stops at the same step), which is how
``max_steps=None`` training ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    from graft.train.estimator import Estimator

__all__ = ["Callback", "StopWhen"]


class Callback:
    """The hooks; each does nothing unless overridden."""

    def on_step(self, estimator: Estimator, step: int, logs: Mapping[str, float]) -> None:
        """After optimizer step ``step``; ``logs`` holds ``loss`` (this worker's batch mean)
        and ``lr``."""

    def on_evaluate(self, estimator: Estimator, metrics: Mapping[str, Any]) -> None:
        """After an evaluation, with its results (``loss``, ``examples``, ``step``, ...)."""

    def on_checkpoint(self, estimator: Estimator, path: Path) -> None:
        """After the checkpoint ``path`` was written completely (and renamed into place)."""


class StopWhen(Callback):
    """Stop training when ``condition(step, logs)`` is true after a step.

    ``StopWhen(lambda step, logs: logs["loss"] < 0.05)`` ends a ``max_steps=None`` run once
    the training loss is small. On several workers each evaluates its own batch's loss; the
    run stops when any of them asks (all stop at the same step).
    """

    def __init__(self, condition: Callable[[int, Mapping[str, float]], bool]) -> None:
        if not callable(condition):
            raise ValueError(f"StopWhen needs a function (step, logs) -> bool; got "
                             f"{type(condition).__name__}")
        self.condition = condition

    def on_step(self, estimator: Estimator, step: int, logs: Mapping[str, float]) -> None:
        if self.condition(step, logs):
            estimator.request_stop()
