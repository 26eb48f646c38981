"""Softmax cross-entropy: a categorical model ``p = softmax(logits)``, dense or sparse labels.

The dense loss takes a distribution over the classes per example (one-hot or soft) and is
keyword-only in ``labels`` and ``logits``: the two have one shape, so a swapped positional
call would compute a wrong number without an error. The sparse loss takes integer class
indices; swapping its arguments cannot go unnoticed (integer logits are refused), so it also
accepts torch's positional ``(logits, labels)``.

``ignore_index`` (default ``-100``, as in ``torch.nn.functional.cross_entropy``): a sparse
label equal to it marks an example that contributes 0 and is left out of the mean's
denominator. A label of ``-100`` is therefore never an error; pass another ``ignore_index``
(or ``None``) when ``-100`` could be a mistake in your labels rather than padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from graft.errors import DataError
from graft.losses.base import (
    Loss,
    Reduction,
    check_label_smoothing,
    check_same_shape,
    class_dim,
    compute_dtype,
)

__all__ = [
    "SoftmaxCrossEntropy",
    "SparseSoftmaxCrossEntropy",
    "softmax_cross_entropy",
    "sparse_softmax_cross_entropy",
]


class SoftmaxCrossEntropy(Loss):
    """Cross-entropy between dense label distributions and ``softmax(logits)``.

    The per-example loss is ``-sum_c y_c * log_softmax(logits)_c`` over the class dimension,
    the negative log-likelihood of a categorical model when ``y`` is one-hot. With label
    smoothing ``eps`` the labels become ``(1 - eps) * y + eps / num_classes``.

    Call as ``loss(labels=y, logits=x, weights=None)``; ``labels`` has the shape of
    ``logits`` (rows should sum to 1; not checked), ``weights`` the batch shape
    (``logits.shape`` without ``dim``).

    Args:
        label_smoothing: Mass in [0, 1] spread uniformly over the classes.
        reduction: ``"mean"`` (weighted mean), ``"sum"`` or ``"none"``.
        dim: The class dimension.
    """

    name = "softmax_cross_entropy"

    def __init__(self, *, label_smoothing: float = 0.0, reduction: Reduction = "mean",
                 dim: int = -1) -> None:
        super().__init__(reduction=reduction)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.dim = dim

    def per_example(self, labels: torch.Tensor,
                    logits: torch.Tensor) -> tuple[torch.Tensor, None]:
        dim = class_dim(logits, self.dim, self.name)
        if labels.shape != logits.shape and labels.shape == logits.shape[:dim] + \
                logits.shape[dim + 1:]:
            check_same_shape(labels, logits, self.name,
                             "Integer class indices go to sparse_softmax_cross_entropy.")
        check_same_shape(labels, logits, self.name, "Give a distribution over the classes "
                         "per example, or one-hot labels.")
        dtype = compute_dtype(logits)
        logp = torch.log_softmax(logits.to(dtype), dim=dim)
        y = labels.to(dtype)
        if self.label_smoothing:
            eps = self.label_smoothing
            y = (1.0 - eps) * y + eps / logits.shape[dim]
        return -(y * logp).sum(dim=dim), None

    def extra_repr(self) -> str:
        return (f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, "
                f"dim={self.dim}")


class SparseSoftmaxCrossEntropy(Loss):
    """Cross-entropy between integer class labels and ``softmax(logits)``.

    The per-example loss is ``-log_softmax(logits)[label]``. With label smoothing ``eps`` it
    is ``(1 - eps) * nll + eps * mean_c(-log_softmax(logits)_c)``, the dense loss against
    ``(1 - eps) * one_hot + eps / C``. Labels equal to ``ignore_index`` count for nothing
    (see the module docstring).

    Call as ``loss(logits, labels)`` or ``loss(labels=..., logits=...)``: ``logits``
    ``(..., C)`` with classes last, ``labels`` integer indices of shape ``(...)``.

    Args:
        label_smoothing: Mass in [0, 1] spread uniformly over the classes.
        ignore_index: The label value that marks an example to skip (default -100, torch's);
            None: every label must be a class.
        reduction: ``"mean"`` (weighted mean over kept examples), ``"sum"`` or ``"none"``
            (0 where ignored).
    """

    name = "sparse_softmax_cross_entropy"

    def __init__(self, *, label_smoothing: float = 0.0, ignore_index: int | None = -100,
                 reduction: Reduction = "mean") -> None:
        super().__init__(reduction=reduction)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        if ignore_index is not None and (isinstance(ignore_index, bool)
                                         or not isinstance(ignore_index, int)):
            raise ValueError(f"argument 'ignore_index' must be an int label value or None; "
                             f"got {ignore_index!r}")
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]
                weights: torch.Tensor | float | None = None) -> torch.Tensor:
        """The reduced loss (0-d) or per-example losses ``(...)``."""
        if weights is None and isinstance(logits, torch.Tensor) and logits.dim() == 2 \
                and logits.dtype in (torch.float32, torch.float64) \
                and logits.device.type == "cpu" and isinstance(labels, torch.Tensor) \
                and self.reduction != "none" and not _bad_label_dtype(labels) \
                and labels.shape == logits.shape[:1]:
            return self._fused(logits, labels)
        return self.compute(labels, logits, weights)

    def _fused(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The common case through torch's fused kernel: the same log-softmax and gather,
        # several times faster per step for small heads. On CPU it reports an out-of-range
        # class itself, which becomes the same clear error as the general path's.
        ignore = -100 if self.ignore_index is None else self.ignore_index
        try:
            loss = F.cross_entropy(logits, labels.long(), ignore_index=ignore,
                                   reduction=self.reduction,
                                   label_smoothing=self.label_smoothing)
        except (RuntimeError, IndexError):
            self._check_range(labels, logits.shape[-1])
            raise
        if self.ignore_index is None:  # torch would skip -100 silently; nothing may be
            self._check_range(labels, logits.shape[-1])
        if self.reduction == "mean" and math.isnan(loss.item()):
            # torch's mean is 0/0 when every label is ignored; the general path gives 0
            # then, and NaN still for non-finite logits. A CPU host read costs nothing here.
            return self.compute(labels, logits, None)
        return loss

    def per_example(self, labels: torch.Tensor,
                    logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fn = self.name
        class_dim(logits, -1, fn)
        if _bad_label_dtype(labels):
            raise DataError(
                f"{fn}: input 'labels' must hold integer class indices; got dtype "
                f"{labels.dtype}. Convert indices with `.long()`, or pass probability "
                "distributions to softmax_cross_entropy instead.")
        batch_shape = logits.shape[:-1]
        if labels.shape != batch_shape:
            raise DataError(
                f"{fn}: input 'labels' must have shape {tuple(batch_shape)} (the logits' "
                f"shape {tuple(logits.shape)} without the class dim); got "
                f"{tuple(labels.shape)}. Dense or one-hot labels go to softmax_cross_entropy.")
        keep = self._check_range(labels, logits.shape[-1])
        dtype = compute_dtype(logits)
        logp = torch.log_softmax(logits.to(dtype), dim=-1)
        index = torch.where(keep, labels, torch.zeros_like(labels)).long()
        nll = -logp.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        if self.label_smoothing:
            eps = self.label_smoothing
            nll = (1.0 - eps) * nll - eps * logp.mean(dim=-1)
        return nll, keep

    def _check_range(self, labels: torch.Tensor, classes: int) -> torch.Tensor:
        """The keep-mask; one host sync, so an out-of-range class is a clear error instead
        of a crash in gather (or a device-side assert on CUDA)."""
        keep = labels != self.ignore_index if self.ignore_index is not None \
            else torch.ones_like(labels, dtype=torch.bool)
        bad = keep & ((labels < 0) | (labels >= classes))
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            raise DataError(
                f"{self.name}: input 'labels' holds class {first}, outside [0, {classes}) for "
                f"logits with {classes} classes (ignore_index={self.ignore_index}). Fix the "
                "labels or pass the matching ignore_index.")
        return keep

    def extra_repr(self) -> str:
        return (f"label_smoothing={self.label_smoothing}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}")


def _bad_label_dtype(labels: torch.Tensor) -> bool:
    return labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool


def softmax_cross_entropy(*, labels: torch.Tensor, logits: torch.Tensor,
                          weights: torch.Tensor | float | None = None,
                          label_smoothing: float = 0.0, reduction: Reduction = "mean",
                          dim: int = -1) -> torch.Tensor:
    """Function form of :class:`SoftmaxCrossEntropy`; ``labels`` and ``logits`` by keyword.

    Returns:
        The loss in ``float32`` (``float64`` for ``float64`` logits); 0-d unless
        ``reduction="none"`` (then the batch shape).

    Raises:
        ValueError: ``reduction``, ``label_smoothing`` or ``dim`` is invalid.
        DataError: ``labels`` or ``weights`` do not match the logits' shape.
    """
    return SoftmaxCrossEntropy(label_smoothing=label_smoothing, reduction=reduction,
                               dim=dim)(labels=labels, logits=logits, weights=weights)


def sparse_softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *,
                                 weights: torch.Tensor | float | None = None,
                                 label_smoothing: float = 0.0,
                                 ignore_index: int | None = -100,
                                 reduction: Reduction = "mean") -> torch.Tensor:
    """Function form of :class:`SparseSoftmaxCrossEntropy` (integer class labels).

    Returns:
        The loss in ``float32`` (``float64`` for ``float64`` logits); 0-d unless
        ``reduction="none"`` (then ``labels.shape``, 0 where ignored).

    Raises:
        ValueError: ``reduction``, ``label_smoothing`` or ``ignore_index`` is invalid.
        DataError: ``labels`` are not integers, have the wrong shape, or hold a class
            outside ``[0, C)``; ``weights`` do not broadcast.
    """
    return SparseSoftmaxCrossEntropy(label_smoothing=label_smoothing, ignore_index=ignore_index,
                                     reduction=reduction)(logits, labels, weights)
