"""Evaluation metrics for classifiers, kept as exact counts that sum across workers.

Every metric is a ratio of sums (correct predictions over examples, summed losses over
examples), so each worker counts its own shard and one all-reduce of the counts gives the
metric over the whole dataset, with each example counted exactly once, whatever the batch
size and however the last batch is cut.

Built-in metric names (the ``metrics=`` of the Estimator; functions and metric objects are
:mod:`graft.train.custom_metrics`):

* ``"accuracy"``: the fraction of examples whose highest logit is the label's.
* ``"top<k>"`` (``"top5"``): the fraction whose label is among the ``k`` highest logits (``k``
  larger than the number of classes counts every example).
* ``"confusion_matrix"``: an ``int64`` tensor ``(C, C)``; row = true class, column =
  predicted class.

``"loss"`` and ``"examples"`` are always reported.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import torch

from graft.errors import DataError

__all__ = ["ClassificationMetrics", "check_metrics"]

_NAME = re.compile(r"^(accuracy|top([1-9][0-9]*)|confusion_matrix)$")


def check_metrics(names: Sequence[str] | str) -> tuple[str, ...]:
    """Validate metric names and return them as a tuple, without duplicates.

    Raises:
        ValueError: a name is not ``accuracy``, ``top<k>`` or ``confusion_matrix``.
    """
    if isinstance(names, str):
        names = (names,)
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"metrics: unknown metric {name!r}; use 'accuracy', 'top<k>' "
                             "(e.g. 'top5'), 'confusion_matrix', a function fn(logits, "
                             "labels) or a metric object (torchmetrics), or metrics=() for "
                             "the loss alone")
        if name not in out:
            out.append(name)
    return tuple(out)


class ClassificationMetrics:
    """Running sums for one evaluation: update per batch, then :meth:`compute` once.

    The counts stay on the logits' device; nothing synchronises with the host per batch
    except the label-range check.

    Args:
        names: Metric names, see :func:`check_metrics`.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = check_metrics(names)
        self.ks = sorted({int(m.group(2)) for n in self.names
                          if (m := _NAME.match(n)) and m.group(2)})
        self._examples = 0
        self._labels = 0
        self._loss_sum: torch.Tensor | None = None
        self._correct: torch.Tensor | None = None
        self._topk: torch.Tensor | None = None
        self._confusion: torch.Tensor | None = None
        self._classes: int | None = None

    @property
    def needs_labels(self) -> bool:
        """True when any metric compares predictions with class labels."""
        return bool(self.names)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        """Count one batch.

        Args:
            logits: ``(B, ..., C)`` scores.
            labels: ``(B, ...)`` integer class indices (only read when a metric needs them).
            loss: The batch's mean loss (0-d); weighted by ``B`` into the running sum.

        Raises:
            DataError: labels are not integer class indices in ``[0, C)`` of the right shape.
        """
        batch = int(labels.shape[0]) if labels.dim() else 1
        loss_sum = loss.detach().to(torch.float64) * batch
        self._loss_sum = loss_sum if self._loss_sum is None else self._loss_sum + loss_sum
        self._examples += batch
        if not self.needs_labels:
            return
        classes = logits.shape[-1]
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise DataError(f"metrics {list(self.names)} need integer class labels; got "
                            f"{labels.dtype}. Convert with `.long()`, or pass metrics=() "
                            "for labels that are not class indices")
        if labels.shape != logits.shape[:-1]:
            raise DataError(f"metrics {list(self.names)} need labels of shape "
                            f"{tuple(logits.shape[:-1])} (the logits' shape "
                            f"{tuple(logits.shape)} without the class dim); got "
                            f"{tuple(labels.shape)}")
        if self._classes is None:
            self._classes = classes
            device = logits.device
            self._correct = torch.zeros((), dtype=torch.int64, device=device)
            self._topk = torch.zeros(len(self.ks), dtype=torch.int64, device=device)
            self._confusion = torch.zeros(classes * classes, dtype=torch.int64, device=device)
        elif classes != self._classes:
            raise DataError(f"the model returned {classes} classes for one batch and "
                            f"{self._classes} for another; logits must keep their class dim")
        flat_logits = logits.detach().reshape(-1, classes)  # (N, C)
        flat_labels = labels.reshape(-1).to(device=flat_logits.device, dtype=torch.int64)
        bad = (flat_labels < 0) | (flat_labels >= classes)
        if bool(bad.any()):
            raise DataError(f"labels hold class {int(flat_labels[bad][0])}, outside [0, "
                            f"{classes}) for a model with {classes} outputs; fix the labels "
                            "or the model's number of classes")
        self._labels += flat_labels.numel()
        predicted = flat_logits.argmax(dim=-1)  # (N,)
        self._correct += (predicted == flat_labels).sum()
        if self.ks:
            top = flat_logits.topk(min(self.ks[-1], classes), dim=-1).indices  # (N, K)
            hits = top == flat_labels.unsqueeze(-1)  # (N, K); at most one True per row
            for i, k in enumerate(self.ks):
                self._topk[i] += hits[:, :k].sum()
        self._confusion += torch.bincount(flat_labels * classes + predicted,
                                          minlength=classes * classes)

    def compute(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                device: torch.device | None = None) -> dict[str, Any]:
        """The metrics over everything counted, summed over workers by ``all_reduce_sum``.

        Args:
            all_reduce_sum: A strategy's sum over workers; ``None``: this process only.
            device: Where to build the packed counts when this worker counted nothing.

        Returns:
            ``{"loss": float, "examples": int, "accuracy": float, "top5": float,
            "confusion_matrix": LongTensor(C, C)}`` for the metrics asked for. ``loss`` is
            NaN when nothing was counted.
        """
        device = device or (self._loss_sum.device if self._loss_sum is not None
                            else torch.device("cpu"))
        loss_sum = (self._loss_sum if self._loss_sum is not None
                    else torch.zeros((), dtype=torch.float64, device=device))
        # One float64 vector, one collective; float64 counts are exact below 2**53.
        parts = [torch.tensor([self._examples, self._labels], dtype=torch.float64,
                              device=device), loss_sum.reshape(1).to(device)]
        if self.needs_labels and self._classes is not None:
            parts += [self._correct.reshape(1), self._topk, self._confusion]
        packed = torch.cat([p.to(device=device, dtype=torch.float64) for p in parts])
        if all_reduce_sum is not None:
            packed = all_reduce_sum(packed)
        values = packed.cpu().tolist()
        examples, labels, loss_sum_value = int(values[0]), int(values[1]), values[2]
        result: dict[str, Any] = {
            "loss": loss_sum_value / examples if examples else float("nan"),
            "examples": examples,
        }
        if not self.needs_labels or self._classes is None:
            return result
        correct = values[3]
        topk = values[4:4 + len(self.ks)]
        confusion = packed[4 + len(self.ks):].to(torch.int64).cpu()
        classes = self._classes
        if "accuracy" in self.names:
            result["accuracy"] = correct / labels if labels else float("nan")
        for k, hits in zip(self.ks, topk):
            result[f"top{k}"] = hits / labels if labels else float("nan")
        if "confusion_matrix" in self.names:
            result["confusion_matrix"] = confusion.reshape(classes, classes)
        return result
