"""The :class:`Loss` base class: reduction, weights and input checks, once for every loss.

A loss is a per-example formula (what each subclass writes) followed by the same weighting
and reduction (what this class owns), as Keras's ``Loss.__call__`` owns reduction for every
Keras loss. Subclasses implement :meth:`Loss.per_example`; nothing else.

Conventions shared by every loss:

* Inputs are **logits** (unnormalised). Log-probabilities come from ``log_softmax`` and
  ``logsigmoid``, never from the log of a probability, so logits of magnitude 1e4 give
  finite, exact losses.
* Half-precision logits are computed in ``float32`` and the loss is returned in ``float32``
  (``torch.promote_types(logits.dtype, torch.float32)``): a half-precision sum of many
  per-example losses would overflow ``float16``. Gradients reach the logits in their dtype.
* ``weights`` are per-example weights broadcast against the batch shape (the shape of the
  per-example loss). They should be non-negative.
* ``reduction="none"`` returns the weighted per-example losses (``weight * loss``), ``"sum"``
  their sum, and ``"mean"`` the **weighted mean** ``sum(weight * loss) / sum(weight)`` over
  the examples that count. When nothing counts (an empty batch, every label ignored, all
  weights zero) the mean is 0, not NaN, so one bad batch does not poison training.
* ``labels`` and ``logits`` are keyword-only wherever swapping them would give a wrong number
  without an error (the dense and sigmoid losses, whose labels and logits have one shape):
  TensorFlow passes ``(labels, logits)``, torch ``(input, target)``, and a keyword is the one
  spelling both read the same way.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from graft.errors import DataError

__all__ = [
    "Loss",
    "Reduction",
    "as_weights",
    "check_label_smoothing",
    "check_logits",
    "check_reduction",
    "check_same_shape",
    "check_tensor",
    "class_dim",
    "compute_dtype",
    "reduce",
]

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")


class Loss(nn.Module):
    """A loss: a per-example formula, then weighting and reduction.

    Call it as ``loss(labels=..., logits=..., weights=None)``.

    Args:
        reduction: ``"mean"`` (weighted mean over the examples that count), ``"sum"`` or
            ``"none"`` (weighted per-example losses).

    Raises:
        ValueError: ``reduction`` is not one of the three.
    """

    #: The name used in error messages (the function form's name).
    name = "loss"

    def __init__(self, *, reduction: Reduction = "mean") -> None:
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction

    def per_example(self, labels: torch.Tensor,
                    logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The unweighted per-example losses, and a keep-mask (None: every example counts).

        Subclasses implement this; inputs are already checked to be tensors with floating
        logits. The loss has the batch shape; a False in the mask leaves that example out of
        the sum and of the mean's denominator.
        """
        raise NotImplementedError

    def forward(self, *, labels: torch.Tensor, logits: torch.Tensor,
                weights: torch.Tensor | float | None = None) -> torch.Tensor:
        """The reduced loss (0-d), or weighted per-example losses for ``reduction="none"``.

        Args:
            labels: The targets; the shape and kind each subclass documents.
            logits: Unnormalised scores.
            weights: Per-example weights broadcastable to the batch shape, or None.
        """
        return self.compute(labels, logits, weights)

    def compute(self, labels: torch.Tensor, logits: torch.Tensor,
                weights: torch.Tensor | float | None) -> torch.Tensor:
        """Check the inputs, apply :meth:`per_example`, weight and reduce."""
        check_logits(logits, self.name)
        check_tensor(labels, "labels", self.name)
        loss, keep = self.per_example(labels, logits)
        w = as_weights(weights, loss.shape, loss.dtype, logits.device, self.name)
        return reduce(loss, w, self.reduction, keep)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


# -- checks shared by the losses -------------------------------------------------------------


def check_reduction(reduction: object) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"argument 'reduction' must be one of 'mean', 'sum', 'none'; got {reduction!r}. "
            "Pass reduction='mean' for the weighted mean over examples, 'sum' for the total, "
            "or 'none' for per-example losses.")


def check_label_smoothing(label_smoothing: object) -> float:
    if not isinstance(label_smoothing, (int, float)) or isinstance(label_smoothing, bool):
        raise ValueError(
            f"argument 'label_smoothing' must be a float in [0, 1]; got "
            f"{type(label_smoothing).__name__} {label_smoothing!r}. Pass a Python float "
            "such as label_smoothing=0.1.")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(
            f"argument 'label_smoothing' must be in [0, 1]; got {label_smoothing!r}. Use 0.0 "
            "for no smoothing; typical values are 0.05 to 0.2.")
    return float(label_smoothing)


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for half, bfloat16 and float32 logits; float64 stays float64."""
    return torch.promote_types(logits.dtype, torch.float32)


def check_logits(logits: object, fn: str) -> None:
    if not isinstance(logits, torch.Tensor):
        raise DataError(f"{fn}: input 'logits' must be a torch.Tensor; got "
                        f"{type(logits).__name__}. Wrap it with torch.as_tensor(...).")
    if not logits.is_floating_point():
        raise DataError(f"{fn}: input 'logits' must be a floating-point tensor; got "
                        f"{logits.dtype}{list(logits.shape)}. Convert with `.float()`; if "
                        "these are the labels, pass labels= and logits= by keyword.")


def check_tensor(value: object, name: str, fn: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise DataError(f"{fn}: input '{name}' must be a torch.Tensor; got "
                        f"{type(value).__name__}. Wrap it with torch.as_tensor(...).")


def check_same_shape(labels: torch.Tensor, logits: torch.Tensor, fn: str, fix: str) -> None:
    if labels.shape != logits.shape:
        raise DataError(f"{fn}: input 'labels' must have the same shape as 'logits' "
                        f"{tuple(logits.shape)}; got {tuple(labels.shape)}. {fix}")


def class_dim(logits: torch.Tensor, dim: int, fn: str) -> int:
    """``dim`` as a non-negative index of the logits' class dimension."""
    if logits.dim() == 0:
        raise DataError(f"{fn}: input 'logits' must have a class dimension; got a 0-d tensor. "
                        "Give logits of shape (..., num_classes).")
    if isinstance(dim, bool) or not isinstance(dim, int) \
            or not -logits.dim() <= dim < logits.dim():
        raise ValueError(
            f"{fn}: argument 'dim' must index a dimension of logits with shape "
            f"{tuple(logits.shape)} (between {-logits.dim()} and {logits.dim() - 1}); got "
            f"dim={dim}. Pass the class dimension, usually dim=-1.")
    return dim % logits.dim()


def as_weights(weights: torch.Tensor | float | None, batch_shape: torch.Size,
               dtype: torch.dtype, device: torch.device, fn: str) -> torch.Tensor | None:
    """``weights`` as a tensor of ``dtype`` that broadcasts to ``batch_shape``, or None."""
    if weights is None:
        return None
    weights = torch.as_tensor(weights, device=device)
    try:
        shape = torch.broadcast_shapes(weights.shape, batch_shape)
    except RuntimeError:
        shape = None
    if shape != batch_shape:
        raise DataError(
            f"{fn}: input 'weights' with shape {tuple(weights.shape)} does not broadcast to "
            f"the batch shape {tuple(batch_shape)} (the shape of the per-example loss). Give "
            f"one weight per example, shape {tuple(batch_shape)}, or a shape that broadcasts "
            "to it.")
    return weights.to(dtype)


def reduce(loss: torch.Tensor, weights: torch.Tensor | None, reduction: str,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Weight per-example losses, drop the masked-out ones, and reduce.

    Args:
        loss: Per-example losses, the batch shape.
        weights: Weights broadcastable to the batch shape, or None.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        mask: Boolean, the batch shape; False marks examples that contribute nothing and are
            left out of the mean's denominator.
    """
    w = torch.ones((), dtype=loss.dtype, device=loss.device) if weights is None else weights
    w = w.expand(loss.shape)
    if mask is not None:
        zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
        w = torch.where(mask, w, zero)
        # where, not a product: a non-finite loss at an ignored position must not leak NaN.
        weighted = torch.where(mask, w * loss, zero)
    else:
        weighted = w * loss
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    denom = w.sum()
    # Dividing by 1 when nothing counts gives 0 (total is 0 then) with a finite gradient,
    # where a where() around total / denom would back-propagate NaN.
    safe = torch.where(denom != 0, denom, torch.ones((), dtype=denom.dtype, device=denom.device))
    return total / safe
