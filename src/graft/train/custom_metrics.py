"""Evaluation metrics a user passes: functions and metric objects, exact over N workers.

``Estimator(metrics=...)`` takes, besides the built-in names (:mod:`graft.train.metrics`):

* a **function** ``fn(logits, labels) -> tensor``: per-example values ``(B,)`` or a batch
  mean (0-d). The result is the mean over every example of the evaluation set, kept as a
  float64 sum and a count per worker and summed over workers (like Keras's
  ``MeanMetricWrapper``). It suits metrics that are means of per-example values.
* a **metric object** with ``update(preds, target)``, ``compute()`` and ``reset()``, such as
  any ``torchmetrics.Metric`` (F1, AUROC, average precision: metrics that are not means).
  It is reset before each evaluation, updated with ``(logits, labels)`` per batch, and its
  state is merged over workers before ``compute``: torchmetrics reduces each state as it
  declares (sums add, concatenated states are gathered), through the strategy's
  ``gather_states`` (tensors and JSON, nothing pickled), so the value is the one a single
  worker would compute over the whole set.

A list names each entry after the function (``fn.__name__``) or the object's class in snake
case (``MulticlassF1Score`` -> ``multiclass_f1_score``); a dict names them explicitly.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import torch

from graft.errors import DataError
from graft.train.metrics import check_metrics

__all__ = ["CustomMetrics", "metric_name", "split_metrics"]



def _is_metric_object(value: Any) -> bool:
    return all(callable(getattr(value, m, None)) for m in ("update", "compute", "reset"))


def metric_name(value: Any) -> str:
    """The result key of a metric given without a name."""
    if _is_metric_object(value):
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_",
                      type(value).__name__).lower()
    name = getattr(value, "__name__", None)
    if not isinstance(name, str) or name == "<lambda>":
        raise ValueError(f"metrics: cannot name the metric {value!r}; pass a dict "
                         "{'name': metric} to name it")
    return name


def split_metrics(spec: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Built-in metric names, and the custom metrics by name.

    Raises:
        ValueError: an entry is neither a built-in name, a function nor a metric object, or
            two entries share a name (or take one of ``loss``, ``examples``, ``step``).
    """
    items: list[tuple[str | None, Any]]
    if isinstance(spec, str):
        items = [(None, spec)]
    elif isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, Sequence) or _is_metric_object(spec) or callable(spec):
        items = [(None, v) for v in spec] if isinstance(spec, Sequence) else [(None, spec)]
    else:
        raise ValueError(f"metrics must be a list or dict of metric names, functions and "
                         f"metric objects; got {type(spec).__name__}")
    builtin: list[str] = []
    custom: dict[str, Any] = {}
    for key, value in items:
        if isinstance(value, str):
            if key is not None and key != value:
                raise ValueError(f"metrics: the built-in metric {value!r} keeps its name; "
                                 f"list it instead of naming it {key!r}")
            check_metrics(value)
            if value not in builtin:
                builtin.append(value)
            continue
        if not (_is_metric_object(value) or callable(value)):
            raise ValueError(f"metrics: {value!r} is neither a metric name, a function "
                             "fn(logits, labels) -> tensor, nor a metric object with "
                             "update/compute/reset (a torchmetrics.Metric)")
        name = key if key is not None else metric_name(value)
        if not isinstance(name, str) or not name:
            raise ValueError(f"metrics: metric names must be non-empty strings; got {name!r}")
        if name in custom or name in builtin or name in ("loss", "examples", "step") \
                or _is_builtin(name):
            raise ValueError(f"metrics: two metrics are named {name!r} (or it is a reserved "
                             "result key); pass a dict to give each its own name")
        custom[name] = value
    return tuple(builtin), custom


def _is_builtin(name: str) -> bool:
    try:
        check_metrics(name)
    except ValueError:
        return False
    return True


class CustomMetrics:
    """One evaluation's state of the custom metrics: update per batch, compute once."""

    def __init__(self, metrics: Mapping[str, Any], device: torch.device) -> None:
        self._functions: dict[str, Callable[..., Any]] = {}
        self._objects: dict[str, Any] = {}
        for name, value in metrics.items():
            (self._objects if _is_metric_object(value) else self._functions)[name] = value
        self._sums = torch.zeros(len(self._functions), dtype=torch.float64, device=device)
        self._counts = torch.zeros(len(self._functions), dtype=torch.float64, device=device)
        self.device = device
        for metric in self._objects.values():
            if hasattr(metric, "to"):
                metric.to(device)
            metric.reset()

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Count one batch."""
        for i, (name, fn) in enumerate(self._functions.items()):
            value = fn(logits, labels)
            if not isinstance(value, torch.Tensor):
                value = torch.as_tensor(value, device=logits.device)
            batch = int(labels.shape[0]) if labels.dim() else 1
            value = value.detach().to(device=self.device, dtype=torch.float64)
            if value.dim() == 0:
                self._sums[i] += value * batch
                self._counts[i] += batch
            elif value.dim() == 1 and value.shape[0] == batch:
                self._sums[i] += value.sum()
                self._counts[i] += value.numel()
            else:
                raise DataError(f"metric {name!r} returned shape {tuple(value.shape)} for a "
                                f"batch of {batch}; return per-example values ({batch},) or "
                                "a 0-d batch mean")
        for metric in self._objects.values():
            metric.update(logits, labels)

    def compute(self, strategy: Any) -> dict[str, Any]:
        """The metrics over every worker's examples."""
        result: dict[str, Any] = {}
        if self._functions:
            packed = strategy.all_reduce_sum(torch.cat([self._sums, self._counts]))
            sums, counts = packed.cpu().tolist()[:len(self._functions)], \
                packed.cpu().tolist()[len(self._functions):]
            for name, total, count in zip(self._functions, sums, counts):
                result[name] = total / count if count else float("nan")
        for name, metric in self._objects.items():
            result[name] = _scalar(_compute_synced(metric, strategy))
        return result


def _compute_synced(metric: Any, strategy: Any) -> Any:
    """``metric.compute()`` over all workers' states, gathered through the strategy."""
    if strategy.world_size == 1 or not hasattr(metric, "sync_context"):
        if strategy.world_size > 1:
            raise DataError(f"metric {type(metric).__name__} cannot merge its state over "
                            f"{strategy.world_size} workers: only torchmetrics.Metric objects "
                            "(or functions returning per-example values) can")
        return metric.compute()

    def gather(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
        device = tensor.device
        return [t.to(device) for t in strategy.gather_states(tensor)]

    # torchmetrics merges each state as its metric declared it (sum, cat, min, max, mean),
    # here through the strategy's gather instead of its own torch.distributed calls.
    with metric.sync_context(dist_sync_fn=gather, should_sync=True, should_unsync=True,
                             distributed_available=lambda: True):
        saved = metric._to_sync  # compute() would sync again; this sync is the one
        metric._to_sync = False
        try:
            return metric.compute()
        finally:
            metric._to_sync = saved


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return float(value) if value.dim() == 0 and value.is_floating_point() else \
            int(value) if value.dim() == 0 else value
    return value
