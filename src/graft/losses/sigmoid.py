"""Sigmoid cross-entropy: independent Bernoulli models ``p = sigmoid(logits)``, multi-label.

Every element is its own trial, so every element is an "example": the per-example loss has
the shape of ``logits``. ``labels`` and ``logits`` have one shape, so both losses take them by
keyword only (a swapped positional call would compute a wrong number without an error).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graft.errors import DataError
from graft.losses.base import Loss, Reduction, check_label_smoothing, check_same_shape, \
    compute_dtype

__all__ = [
    "SigmoidCrossEntropy",
    "WeightedCrossEntropy",
    "sigmoid_cross_entropy",
    "weighted_cross_entropy",
]

_SAME = "Give one target in [0, 1] per logit."


class SigmoidCrossEntropy(Loss):
    """Binary cross-entropy of labels under ``sigmoid(logits)``, element-wise.

    The element-wise loss ``-(z * log sigmoid(x) + (1 - z) * log sigmoid(-x))`` is computed as
    ``z * softplus(-x) + (1 - z) * softplus(x)``, finite for any finite ``x``. With label
    smoothing ``eps`` the targets become ``(1 - eps) * z + eps / 2``.

    Call as ``loss(labels=z, logits=x, weights=None)``: ``z`` in [0, 1] with the shape of
    ``x``; ``weights`` broadcastable to it (one weight per row of ``(B, K)``: shape ``(B, 1)``).

    Args:
        label_smoothing: Amount in [0, 1] pulling the targets towards 0.5.
        reduction: ``"mean"`` (weighted mean over elements), ``"sum"`` or ``"none"``.
    """

    name = "sigmoid_cross_entropy"

    def __init__(self, *, label_smoothing: float = 0.0, reduction: Reduction = "mean") -> None:
        super().__init__(reduction=reduction)
        self.label_smoothing = check_label_smoothing(label_smoothing)

    def per_example(self, labels: torch.Tensor,
                    logits: torch.Tensor) -> tuple[torch.Tensor, None]:
        check_same_shape(labels, logits, self.name, _SAME)
        dtype = compute_dtype(logits)
        x, z = logits.to(dtype), labels.to(dtype)
        if self.label_smoothing:
            z = (1.0 - self.label_smoothing) * z + 0.5 * self.label_smoothing
        return -z * F.logsigmoid(x) - (1.0 - z) * F.logsigmoid(-x), None

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}"


class WeightedCrossEntropy(Loss):
    """Sigmoid cross-entropy with the positive term scaled by ``pos_weight``.

    Like TensorFlow's ``weighted_cross_entropy_with_logits`` (and the ``pos_weight`` of
    ``torch.nn.BCEWithLogitsLoss``): ``q * z * softplus(-x) + (1 - z) * softplus(x)`` with
    ``q = pos_weight``. ``q > 1`` trades precision for recall; ``q = 1`` is
    :class:`SigmoidCrossEntropy`. A tensor ``pos_weight`` is a buffer, so it follows the
    module through ``.to(device)`` and into its ``state_dict``.

    Args:
        pos_weight: ``q``, a float or a tensor broadcastable to the logits (often ``(K,)``).
        reduction: ``"mean"`` (weighted mean over elements), ``"sum"`` or ``"none"``.
    """

    name = "weighted_cross_entropy"
    pos_weight: torch.Tensor

    def __init__(self, *, pos_weight: torch.Tensor | float,
                 reduction: Reduction = "mean") -> None:
        super().__init__(reduction=reduction)
        self.register_buffer("pos_weight", torch.as_tensor(
            pos_weight, dtype=pos_weight.dtype if isinstance(pos_weight, torch.Tensor)
            and pos_weight.is_floating_point() else torch.get_default_dtype()))

    def per_example(self, labels: torch.Tensor,
                    logits: torch.Tensor) -> tuple[torch.Tensor, None]:
        check_same_shape(labels, logits, self.name, _SAME)
        q = self.pos_weight.to(logits.device)
        try:
            shape = torch.broadcast_shapes(q.shape, logits.shape)
        except RuntimeError:
            shape = None
        if shape != logits.shape:
            classes = logits.shape[-1] if logits.dim() else 1
            raise DataError(
                f"{self.name}: argument 'pos_weight' with shape {tuple(q.shape)} does not "
                f"broadcast to the logits' shape {tuple(logits.shape)}. Pass a float or one "
                f"weight per class, shape ({classes},).")
        dtype = compute_dtype(logits)
        x, z = logits.to(dtype), labels.to(dtype)
        return -q.to(dtype) * z * F.logsigmoid(x) - (1.0 - z) * F.logsigmoid(-x), None

    def extra_repr(self) -> str:
        return f"pos_weight shape={tuple(self.pos_weight.shape)}, reduction={self.reduction!r}"


def sigmoid_cross_entropy(*, labels: torch.Tensor, logits: torch.Tensor,
                          weights: torch.Tensor | float | None = None,
                          label_smoothing: float = 0.0,
                          reduction: Reduction = "mean") -> torch.Tensor:
    """Function form of :class:`SigmoidCrossEntropy`; ``labels`` and ``logits`` by keyword.

    Returns:
        The loss in ``float32`` (``float64`` for ``float64`` logits); 0-d unless
        ``reduction="none"`` (then ``logits.shape``).

    Raises:
        ValueError: ``reduction`` or ``label_smoothing`` is invalid.
        DataError: ``labels`` or ``weights`` do not match the logits' shape.
    """
    return SigmoidCrossEntropy(label_smoothing=label_smoothing, reduction=reduction)(
        labels=labels, logits=logits, weights=weights)


def weighted_cross_entropy(*, labels: torch.Tensor, logits: torch.Tensor,
                           pos_weight: torch.Tensor | float,
                           weights: torch.Tensor | float | None = None,
                           reduction: Reduction = "mean") -> torch.Tensor:
    """Function form of :class:`WeightedCrossEntropy`; ``labels`` and ``logits`` by keyword.

    Raises:
        ValueError: ``reduction`` is invalid.
        DataError: ``labels``, ``pos_weight`` or ``weights`` do not match the logits' shape.
    """
    return WeightedCrossEntropy(pos_weight=pos_weight, reduction=reduction)(
        labels=labels, logits=logits, weights=weights)
