"""What ``train_and_evaluate`` runs: :class:`TrainSpec`, :class:`EvalSpec`, :class:`EarlyStopping`.

Specs are frozen dataclasses checked when they are built, so a bad value fails at the line
that wrote it, not minutes into training. ``data`` is a map-style dataset (``len`` and
``[i] -> (inputs, label)``), a stream of pairs, or a callable returning one; the rest is plain
values, which ``to_json`` / ``from_json`` carry (``data``, ``exporters`` and callbacks are
left out of the JSON: they are not values).
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
            f"label)), an iterable of (inputs, label) pairs, or a callable returning one; got "
            f"{type(data).__name__} {data!r}. Pass the dataset first, e.g. "
            f"{owner}(data=train_set, ...)")
    if callable(data) or hasattr(data, "__iter__"):
        return
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise ValueError(
            f"{owner}: data must be a map-style dataset (with len() and [i] -> (inputs, "
            f"label)), an iterable of pairs, or a callable returning one; got "
            f"{type(data).__name__}, which has neither __len__/__getitem__ nor __iter__. Wrap "
            "tensors in torch.utils.data.TensorDataset(x, y)")


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
        data: The training set: a map-style dataset of ``(inputs, label)`` items, a stream
            of them (an ``IterableDataset``), or a callable returning one.
        max_steps: The total number of optimizer steps (counting steps already in a resumed
            ``model_dir``); None: until early stopping or a callback stops training (needs
            ``eval_every``).
        batch_size: Examples per step, across all workers (global batch).
        eval_every: Evaluate every this many steps; ``None``: only once, at ``max_steps``.
        checkpoint_every: Save a checkpoint every this many steps; ``None``: the
            Estimator's own ``checkpoint_every``.
        seed: Seeds the epoch orders (and, on a fresh start, the global RNGs).
    """

    data: Any
    max_steps: int | None
    batch_size: int = 32
    eval_every: int | None = None
    checkpoint_every: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_data("TrainSpec", self.data)
        if self.max_steps is not None:
            _positive_int("TrainSpec", "max_steps", self.max_steps,
                          "It is the total number of optimizer steps; use e.g. max_steps=1000, "
                          "or None to train until stopped.")
        elif self.eval_every is None:
            raise ValueError("TrainSpec: max_steps=None trains until early stopping or a "
                             "callback stops it, which needs evaluations: pass eval_every=...")
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
        data: The evaluation set: a map-style dataset of ``(inputs, label)`` items, a stream
            of them, or a callable returning one. Every example is counted exactly once.
        batch_size: Examples per evaluation batch, across all workers.
        steps: Evaluate only the first ``steps`` batches (TF's ``EvalSpec(steps=...)``);
            None: the whole set.
        exporters: :mod:`graft.train.exporters` objects run after each evaluation
            (``BestExporter``, ``LatestExporter``, ``FinalExporter``).
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
    steps: int | None = None
    exporters: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        _check_data("EvalSpec", self.data)
        _positive_int("EvalSpec", "batch_size", self.batch_size,
                      "It is the number of examples per evaluation batch; use e.g. 64.")
        if self.steps is not None:
            _positive_int("EvalSpec", "steps", self.steps,
                          "It counts evaluation batches; use None for the whole set.")
        from graft.train.exporters import Exporter

        exporters = (self.exporters,) if isinstance(self.exporters, Exporter) \
            else tuple(self.exporters)
        bad = [e for e in exporters if not isinstance(e, Exporter)]
        names = [e.name for e in exporters if isinstance(e, Exporter)]
        if bad or len(set(names)) != len(names):
            raise ValueError(f"EvalSpec: exporters must be BestExporter / LatestExporter / "
                             f"FinalExporter objects with distinct names; got "
                             f"{self.exporters!r}")
        object.__setattr__(self, "exporters", exporters)
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
        values = {"batch_size": self.batch_size, "steps": self.steps,
                  "keep_best": self.keep_best,
                  "best_metric": self.best_metric, "best_mode": self.best_mode,
                  "early_stopping": (None if self.early_stopping is None
                                     else dataclasses.asdict(self.early_stopping))}
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, data: Any, exporters: tuple[Any, ...] = ()) -> EvalSpec:
        """Rebuild a spec from :meth:`to_json`'s output, the dataset and the exporters."""
        values = json.loads(text)
        stopping = values.pop("early_stopping")
        return cls(data=data, exporters=exporters, early_stopping=None if stopping is None
                   else EarlyStopping(**stopping), **values)
