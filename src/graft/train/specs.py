"""What ``train_and_evaluate`` runs: :class:`TrainSpec`, :class:`EvalSpec`, :class:`EarlyStopping`.

Specs are frozen dataclasses checked when they are built, so a bad value fails at the line
that wrote it, not minutes into training. ``data`` is a map-style dataset (``len`` and
``[i] -> (inputs, label)``) or a callable returning one; the rest is plain values, which
``to_json`` / ``from_json`` carry (``data`` is left out of the JSON: it is not a value).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["EarlyStopping", "EvalSpec", "TrainSpec"]

_MODES = ("min", "max")


def _positive_int(owner: str, name: str, value: object, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int; got "
                         f"{type(value).__name__} {value!r}. {fix}")


def _check_data(owner: str, data: object) -> None:
    if isinstance(data, (int, float, str, bytes)) or data is None:
        raise ValueError(
            f"{owner}: data must be a map-style dataset (with len() and [i] -> (inputs, "
            f"label)) or a callable returning one; got {type(data).__name__} {data!r}. "
            f"Pass the dataset first, e.g. {owner}(data=train_set, ...)")
    if callable(data) and not hasattr(data, "__getitem__"):
        return
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise ValueError(
            f"{owner}: data must be a map-style dataset (with len() and [i] -> (inputs, "
            f"label)) or a callable returning one; got {type(data).__name__}, which has no "
            f"__len__/__getitem__. Wrap tensors in torch.utils.data.TensorDataset(x, y)")


@dataclass(frozen=True)
class EarlyStopping:
    """Stop training when an evaluation metric stops improving.

    Args:
        metric: The name of a key of ``Estimator.evaluate``'s result (``"loss"``,
            ``"accuracy"``, ``"top5"``).
        patience: How many evaluations in a row may fail to improve on the best before
            training stops.
        mode: ``"min"`` when lower is better (a loss), ``"max"`` when higher is (accuracy).
        min_delta: How much a value must beat the best by to count as an improvement.
    """

    metric: str = "loss"
    patience: int = 3
    mode: Literal["min", "max"] = "min"
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"EarlyStopping: metric must name an evaluation metric such as "
                             f"'loss' or 'accuracy'; got {self.metric!r}")
        _positive_int("EarlyStopping", "patience", self.patience,
                      "It counts evaluations without improvement; use e.g. patience=3.")
        if self.mode not in _MODES:
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max'; got {self.mode!r}. "
                             "Use 'min' for a loss, 'max' for accuracy.")
        if isinstance(self.min_delta, bool) or not isinstance(self.min_delta, (int, float)) \
                or not self.min_delta >= 0:
            raise ValueError(f"EarlyStopping: min_delta must be a number >= 0; got "
                             f"{self.min_delta!r}. Use 0.0 to count any improvement.")

    def improves(self, value: float, best: float | None) -> bool:
        """Whether ``value`` beats ``best`` (``None``: nothing yet) by more than ``min_delta``."""
        if best is None:
            return True
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EarlyStopping:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class TrainSpec:
    """How ``train_and_evaluate`` trains.

    Args:
        data: The training set: a map-style dataset of ``(inputs, label)`` items, or a
            callable returning one.
        max_steps: The total number of optimizer steps (counting steps already in a resumed
            ``model_dir``).
        batch_size: Examples per step, across all workers (global batch).
        eval_every: Evaluate every this many steps; ``None``: only once, at ``max_steps``.
        checkpoint_every: Save a checkpoint every this many steps; ``None``: the
            Estimator's own ``checkpoint_every``.
        seed: Seeds the epoch orders (and, on a fresh start, the global RNGs).
    """

    data: Any
    max_steps: int
    batch_size: int = 32
    eval_every: int | None = None
    checkpoint_every: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_data("TrainSpec", self.data)
        _positive_int("TrainSpec", "max_steps", self.max_steps,
                      "It is the total number of optimizer steps; use e.g. max_steps=1000.")
        _positive_int("TrainSpec", "batch_size", self.batch_size,
                      "It is the number of examples per step; use e.g. batch_size=32.")
        if self.eval_every is not None:
            _positive_int("TrainSpec", "eval_every", self.eval_every,
                          "Use a step count, or None to evaluate only at max_steps.")
        if self.checkpoint_every is not None:
            _positive_int("TrainSpec", "checkpoint_every", self.checkpoint_every,
                          "Use a step count, or None for the Estimator's setting.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"TrainSpec: seed must be an int >= 0; got {self.seed!r}")

    def to_json(self) -> str:
        """The spec's values as JSON, without ``data``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name != "data"}
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, data: Any) -> TrainSpec:
        """Rebuild a spec from :meth:`to_json`'s output and the dataset."""
        return cls(data=data, **json.loads(text))


@dataclass(frozen=True)
class EvalSpec:
    """How ``train_and_evaluate`` evaluates, stops early and keeps the best checkpoint.

    Args:
        data: The evaluation set: a map-style dataset of ``(inputs, label)`` items, or a
            callable returning one. Every example is counted exactly once.
        batch_size: Examples per evaluation batch, across all workers.
        early_stopping: Stop when a metric stops improving; ``None``: train to ``max_steps``.
        keep_best: Copy the checkpoint with the best metric to ``model_dir/best``.
        best_metric: The metric that decides "best"; ``None``: the early-stopping metric,
            or ``"loss"`` without early stopping.
        best_mode: ``"min"`` or ``"max"`` for ``best_metric``; ``None``: the early-stopping
            mode for the same metric, else ``"max"`` for ``accuracy`` and ``topK``,
            ``"min"`` for anything else.
    """

    data: Any
    batch_size: int = 32
    early_stopping: EarlyStopping | None = None
    keep_best: bool = True
    best_metric: str | None = None
    best_mode: Literal["min", "max"] | None = None

    def __post_init__(self) -> None:
        _check_data("EvalSpec", self.data)
        _positive_int("EvalSpec", "batch_size", self.batch_size,
                      "It is the number of examples per evaluation batch; use e.g. 64.")
        if self.early_stopping is not None and not isinstance(self.early_stopping,
                                                                EarlyStopping):
            raise ValueError(f"EvalSpec: early_stopping must be an EarlyStopping or None; got "
                             f"{type(self.early_stopping).__name__}. Use "
                             "EarlyStopping(metric='loss', patience=3, mode='min').")
        if not isinstance(self.keep_best, bool):
            raise ValueError(f"EvalSpec: keep_best must be True or False; got "
                             f"{self.keep_best!r}")
        if self.best_mode is not None and self.best_mode not in _MODES:
            raise ValueError(f"EvalSpec: best_mode must be 'min', 'max' or None; got "
                             f"{self.best_mode!r}")
        if self.best_metric is not None and (not isinstance(self.best_metric, str)
                                             or not self.best_metric):
            raise ValueError(f"EvalSpec: best_metric must name a metric such as 'loss'; got "
                             f"{self.best_metric!r}")

    @property
    def best(self) -> EarlyStopping:
        """The metric, mode and ``min_delta`` that decide which checkpoint is best."""
        stopping = self.early_stopping
        metric = self.best_metric or (stopping.metric if stopping else "loss")
        same = stopping is not None and stopping.metric == metric
        if self.best_mode is not None:
            mode = self.best_mode
        elif same:
            mode = stopping.mode
        else:
            mode = "max" if metric == "accuracy" or metric.startswith("top") else "min"
        return EarlyStopping(metric, 1, mode, stopping.min_delta if same else 0.0)

    def to_json(self) -> str:
        """The spec's values as JSON, without ``data``."""
        values = {"batch_size": self.batch_size, "keep_best": self.keep_best,
                  "best_metric": self.best_metric, "best_mode": self.best_mode,
                  "early_stopping": (None if self.early_stopping is None
                                     else dataclasses.asdict(self.early_stopping))}
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, data: Any) -> EvalSpec:
        """Rebuild a spec from :meth:`to_json`'s output and the dataset."""
        values = json.loads(text)
        stopping = values.pop("early_stopping")
        return cls(data=data, early_stopping=None if stopping is None
                   else EarlyStopping(**stopping), **values)
