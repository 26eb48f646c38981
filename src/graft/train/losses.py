"""Maximum-likelihood losses: cross-entropy in its usual shapes, and KL divergence.

Every loss here is the negative log-likelihood of the labels under a probability
model whose parameters are the network's outputs, so minimising it is maximum
likelihood estimation (see ``docs/mle.md`` for the derivation):

* :func:`softmax_cross_entropy` and :func:`sparse_softmax_cross_entropy`: a
  categorical model, ``p = softmax(logits)``; labels are a distribution over
  the classes (dense) or a class index (sparse).
* :func:`sigmoid_cross_entropy` and :func:`weighted_cross_entropy`: independent
  Bernoulli models, ``p = sigmoid(logits)``, one per element (multi-label).
* :func:`kl_divergence`: ``KL(labels || softmax(logits))``, which differs from
  the softmax cross-entropy only by the labels' entropy, a constant in the
  logits, so it has the same minimiser and the same gradient.

Each function has an ``nn.Module`` twin (:class:`SoftmaxCrossEntropy`, ...)
that holds the keyword options and whose ``forward`` takes
``(logits, labels, weights=None)``.

Conventions shared by all of them:

* Inputs are **logits** (unnormalised). Log-probabilities come from
  ``log_softmax`` and ``logsigmoid`` (the softplus form), never from the log of
  a probability, so logits of magnitude 1e4 give finite, exact losses.
* Half-precision logits (``float16``, ``bfloat16``) are computed in
  ``float32`` and the loss is returned in ``float32``: a half-precision sum of
  many per-example losses of size ~1e4 would overflow ``float16``. In general
  the result dtype is ``torch.promote_types(logits.dtype, torch.float32)``;
  gradients still flow back to the logits in their own dtype.
* ``weights`` are per-example weights, broadcast against the batch shape (the
  shape of the per-example loss, see each function). They should be
  non-negative.
* ``reduction="none"`` returns the weighted per-example losses
  (``weight * loss``), ``"sum"`` their sum, and ``"mean"`` the **weighted
  mean**: ``sum(weight * loss) / sum(weight)``, both sums over the examples
  that count (every example, except those labelled ``ignore_index`` in the
  sparse loss). Without weights this is the plain mean over the counted
  examples. When nothing counts (an empty batch, every label ignored, all
  weights zero) the mean is 0, not NaN, so one bad batch does not poison
  training.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from graft.errors import DataError

__all__ = [
    "KLDivergence",
    "SigmoidCrossEntropy",
    "SoftmaxCrossEntropy",
    "SparseSoftmaxCrossEntropy",
    "WeightedCrossEntropy",
    "kl_divergence",
    "sigmoid_cross_entropy",
    "softmax_cross_entropy",
    "sparse_softmax_cross_entropy",
    "weighted_cross_entropy",
]

_Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------- #
# Validation and reduction helpers
# --------------------------------------------------------------------------- #


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"argument 'reduction' must be one of 'mean', 'sum', 'none'; got "
            f"{reduction!r}. Pass reduction='mean' for the weighted mean over "
            f"examples, 'sum' for the total, or 'none' for per-example losses."
        )


def _check_label_smoothing(label_smoothing: float) -> None:
    if not isinstance(label_smoothing, (int, float)) or isinstance(label_smoothing, bool):
        raise ValueError(
            f"argument 'label_smoothing' must be a float in [0, 1]; got "
            f"{type(label_smoothing).__name__} {label_smoothing!r}. Pass a Python "
            f"float such as label_smoothing=0.1."
        )
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(
            f"argument 'label_smoothing' must be in [0, 1]; got {label_smoothing!r}. "
            f"Use 0.0 for no smoothing; typical values are 0.05 to 0.2."
        )


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    # float32 for half, bfloat16 and float32; float64 stays float64.
    return torch.promote_types(logits.dtype, torch.float32)


def _check_logits(logits: torch.Tensor, fn: str) -> None:
    if not isinstance(logits, torch.Tensor):
        raise DataError(
            f"{fn}: input 'logits' must be a torch.Tensor; got "
            f"{type(logits).__name__}. Wrap it with torch.as_tensor(...)."
        )
    if not logits.is_floating_point():
        raise DataError(
            f"{fn}: input 'logits' must be a floating-point tensor; got "
            f"{logits.dtype}{list(logits.shape)}. Convert with `.float()`."
        )


def _check_tensor(value: object, name: str, fn: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise DataError(
            f"{fn}: input '{name}' must be a torch.Tensor; got "
            f"{type(value).__name__}. Wrap it with torch.as_tensor(...)."
        )


def _class_dim(logits: torch.Tensor, dim: int, fn: str) -> int:
    if logits.dim() == 0:
        raise DataError(
            f"{fn}: input 'logits' must have a class dimension; got a 0-d tensor. "
            f"Give logits of shape (..., num_classes)."
        )
    if not -logits.dim() <= dim < logits.dim():
        raise ValueError(
            f"{fn}: argument 'dim' must index a dimension of logits with shape "
            f"{tuple(logits.shape)} (between {-logits.dim()} and {logits.dim() - 1}); "
            f"got dim={dim}. Pass the class dimension, usually dim=-1."
        )
    return dim % logits.dim()


def _as_weights(
    weights: torch.Tensor | float | None,
    batch_shape: torch.Size,
    dtype: torch.dtype,
    device: torch.device,
    fn: str,
) -> torch.Tensor | None:
    if weights is None:
        return None
    weights = torch.as_tensor(weights, device=device)
    try:
        shape = torch.broadcast_shapes(weights.shape, batch_shape)
    except RuntimeError:
        shape = None
    if shape != batch_shape:
        raise DataError(
            f"{fn}: input 'weights' with shape {tuple(weights.shape)} does not "
            f"broadcast to the batch shape {tuple(batch_shape)} (the shape of the "
            f"per-example loss). Give one weight per example, shape "
            f"{tuple(batch_shape)}, or a shape that broadcasts to it."
        )
    return weights.to(dtype)


def _reduce(
    loss: torch.Tensor,
    weights: torch.Tensor | None,
    reduction: str,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply weights and an optional keep-mask to per-example losses, then reduce.

    Args:
        loss: Per-example losses, shape ``batch_shape``.
        weights: Per-example weights broadcastable to ``batch_shape``, or None.
        reduction: One of ``"mean"``, ``"sum"``, ``"none"``.
        mask: Boolean tensor of ``batch_shape``; False marks examples that
            contribute nothing and are left out of the mean's denominator.

    Returns:
        The weighted per-example losses (``"none"``) or a 0-d tensor.
    """
    w = torch.ones((), dtype=loss.dtype, device=loss.device) if weights is None else weights
    w = w.expand(loss.shape)
    if mask is not None:
        w = torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
        # The where (not a product) keeps a non-finite loss at an ignored
        # position from leaking NaN into the sum.
        zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
        weighted = torch.where(mask, w * loss, zero)
    else:
        weighted = w * loss
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    denom = w.sum()
    # Dividing by 1 when nothing counts gives 0 (total is 0 then) with a finite
    # gradient, where a where() around total / denom would back-propagate NaN.
    safe = torch.where(denom != 0, denom, torch.ones((), dtype=denom.dtype, device=denom.device))
    return total / safe


# --------------------------------------------------------------------------- #
# Functions
# --------------------------------------------------------------------------- #


def softmax_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    weights: torch.Tensor | float | None = None,
    label_smoothing: float = 0.0,
    reduction: _Reduction = "mean",
    dim: int = -1,
) -> torch.Tensor:
    """Cross-entropy between dense label distributions and ``softmax(logits)``.

    The per-example loss is ``-sum_c y_c * log_softmax(logits)_c`` over the class
    dimension ``dim``, the negative log-likelihood of a categorical model when
    ``y`` is one-hot. With label smoothing ``eps`` the labels become
    ``(1 - eps) * y + eps / num_classes``.

    Args:
        logits: Unnormalised scores, shape ``(..., C, ...)`` with classes on ``dim``.
        labels: Probability distributions over the classes, same shape as
            ``logits`` (one-hot or soft). Rows should sum to 1; they are not
            checked.
        weights: Per-example weights broadcastable to the batch shape
            (``logits.shape`` without ``dim``), or None for equal weights.
        label_smoothing: Mass in [0, 1] spread uniformly over the classes.
        reduction: ``"mean"`` (``sum(w * loss) / sum(w)``), ``"sum"`` or
            ``"none"`` (weighted per-example losses of the batch shape).
        dim: The class dimension.

    Returns:
        The loss in ``float32`` for half-precision or ``float32`` logits,
        ``float64`` for ``float64`` logits; 0-d unless ``reduction="none"``.

    Raises:
        ValueError: ``reduction``, ``label_smoothing`` or ``dim`` is invalid.
        DataError: ``labels`` or ``weights`` do not match the logits' shape.
    """
    fn = "softmax_cross_entropy"
    _check_reduction(reduction)
    _check_label_smoothing(label_smoothing)
    _check_logits(logits, fn)
    _check_tensor(labels, "labels", fn)
    dim = _class_dim(logits, dim, fn)
    if labels.shape != logits.shape:
        hint = (
            " Integer class indices go to sparse_softmax_cross_entropy."
            if labels.shape == logits.shape[:dim] + logits.shape[dim + 1 :]
            else ""
        )
        raise DataError(
            f"{fn}: input 'labels' must have the same shape as 'logits' "
            f"{tuple(logits.shape)}; got {tuple(labels.shape)}.{hint}"
        )
    dtype = _compute_dtype(logits)
    logp = torch.log_softmax(logits.to(dtype), dim=dim)
    y = labels.to(dtype)
    if label_smoothing:
        y = (1.0 - label_smoothing) * y + label_smoothing / logits.shape[dim]
    loss = -(y * logp).sum(dim=dim)
    w = _as_weights(weights, loss.shape, dtype, logits.device, fn)
    return _reduce(loss, w, reduction)


def sparse_softmax_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    weights: torch.Tensor | float | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: _Reduction = "mean",
) -> torch.Tensor:
    """Cross-entropy between integer class labels and ``softmax(logits)``.

    The per-example loss is ``-log_softmax(logits)[label]``, the negative
    log-likelihood of the label under a categorical model. With label smoothing
    ``eps`` it is ``(1 - eps) * nll + eps * mean_c(-log_softmax(logits)_c)``,
    the dense loss against ``(1 - eps) * one_hot + eps / C``.

    Examples whose label equals ``ignore_index`` contribute 0 and are left out
    of the mean's denominator (their weights count as 0).

    Args:
        logits: Unnormalised scores, shape ``(..., C)``; classes on the last dim.
        labels: Integer class indices in ``[0, C)`` or ``ignore_index``, shape
            ``(...)`` (the logits' shape without the last dim).
        weights: Per-example weights broadcastable to ``labels.shape``, or None.
        label_smoothing: Mass in [0, 1] spread uniformly over the classes.
        ignore_index: Label value that marks an example to skip.
        reduction: ``"mean"`` (``sum(w * loss) / sum(w)`` over kept examples),
            ``"sum"`` or ``"none"`` (shape ``labels.shape``, 0 where ignored).

    Returns:
        The loss in ``float32`` for half-precision or ``float32`` logits,
        ``float64`` for ``float64`` logits; 0-d unless ``reduction="none"``.

    Raises:
        ValueError: ``reduction`` or ``label_smoothing`` is invalid.
        DataError: ``labels`` are not integers, have the wrong shape, or hold a
            class outside ``[0, C)``; ``weights`` do not broadcast.
    """
    fn = "sparse_softmax_cross_entropy"
    _check_reduction(reduction)
    _check_label_smoothing(label_smoothing)
    _check_logits(logits, fn)
    _check_tensor(labels, "labels", fn)
    _class_dim(logits, -1, fn)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataError(
            f"{fn}: input 'labels' must hold integer class indices; got dtype "
            f"{labels.dtype}. Convert indices with `.long()`, or pass probability "
            f"distributions to softmax_cross_entropy instead."
        )
    batch_shape = logits.shape[:-1]
    if labels.shape != batch_shape:
        raise DataError(
            f"{fn}: input 'labels' must have shape {tuple(batch_shape)} (the "
            f"logits' shape {tuple(logits.shape)} without the class dim); got "
            f"{tuple(labels.shape)}. Dense or one-hot labels go to "
            f"softmax_cross_entropy."
        )
    num_classes = logits.shape[-1]
    keep = labels != ignore_index
    fast = weights is None and logits.dim() == 2 and logits.dtype in (torch.float32,
                                                                      torch.float64)
    if not fast or logits.device.type != "cpu":
        # One host sync: an out-of-range index would otherwise crash gather (or trip a
        # device-side assert on CUDA) with no hint at the cause.
        _check_label_range(labels, keep, num_classes, ignore_index, fn)
    if fast:
        # The common case, through torch's fused kernel: the same log-softmax and gather,
        # several times faster per step for small heads. On CPU it reports an out-of-range
        # class itself, which is turned into the same clear error.
        try:
            loss = torch.nn.functional.cross_entropy(
                logits, labels.long(), ignore_index=ignore_index,
                reduction="none" if reduction == "none" else "sum",
                label_smoothing=label_smoothing)
        except (RuntimeError, IndexError):
            _check_label_range(labels, keep, num_classes, ignore_index, fn)
            raise
        if reduction == "mean":
            loss = loss / keep.sum().clamp(min=1).to(loss.dtype)
        return loss
    dtype = _compute_dtype(logits)
    logp = torch.log_softmax(logits.to(dtype), dim=-1)
    index = torch.where(keep, labels, torch.zeros_like(labels)).long()
    nll = -logp.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(dim=-1)
    w = _as_weights(weights, batch_shape, dtype, logits.device, fn)
    return _reduce(nll, w, reduction, mask=keep)


def _check_label_range(labels: torch.Tensor, keep: torch.Tensor, num_classes: int,
                       ignore_index: int, fn: str) -> None:
    bad = keep & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise DataError(
            f"{fn}: input 'labels' holds class {first}, outside [0, {num_classes}) "
            f"for logits with {num_classes} classes (ignore_index={ignore_index}). "
            f"Fix the labels or pass the matching ignore_index."
        )


def sigmoid_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    weights: torch.Tensor | float | None = None,
    label_smoothing: float = 0.0,
    reduction: _Reduction = "mean",
) -> torch.Tensor:
    """Binary cross-entropy of labels under ``sigmoid(logits)``, element-wise.

    Every element is an independent Bernoulli trial (multi-label
    classification), so every element is an "example": the per-example loss
    ``-(z * log sigmoid(x) + (1 - z) * log sigmoid(-x))`` has the shape of
    ``logits``, and is computed as ``z * softplus(-x) + (1 - z) * softplus(x)``.
    With label smoothing ``eps`` the targets become ``(1 - eps) * z + eps / 2``.

    Args:
        logits: Unnormalised scores ``x``, any shape.
        labels: Targets ``z`` in [0, 1], same shape as ``logits``.
        weights: Weights broadcastable to ``logits.shape`` (for one weight per
            row of ``(B, K)`` logits pass shape ``(B, 1)``), or None.
        label_smoothing: Amount in [0, 1] pulling the targets towards 0.5.
        reduction: ``"mean"`` (``sum(w * loss) / sum(w)`` over elements),
            ``"sum"`` or ``"none"`` (shape ``logits.shape``).

    Returns:
        The loss in ``float32`` for half-precision or ``float32`` logits,
        ``float64`` for ``float64`` logits; 0-d unless ``reduction="none"``.

    Raises:
        ValueError: ``reduction`` or ``label_smoothing`` is invalid.
        DataError: ``labels`` or ``weights`` do not match the logits' shape.
    """
    fn = "sigmoid_cross_entropy"
    _check_reduction(reduction)
    _check_label_smoothing(label_smoothing)
    _check_logits(logits, fn)
    _check_tensor(labels, "labels", fn)
    if labels.shape != logits.shape:
        raise DataError(
            f"{fn}: input 'labels' must have the same shape as 'logits' "
            f"{tuple(logits.shape)}; got {tuple(labels.shape)}. Give one target "
            f"in [0, 1] per logit."
        )
    dtype = _compute_dtype(logits)
    x = logits.to(dtype)
    z = labels.to(dtype)
    if label_smoothing:
        z = (1.0 - label_smoothing) * z + 0.5 * label_smoothing
    # -log sigmoid(x) = softplus(-x): finite for any finite x.
    loss = -z * F.logsigmoid(x) - (1.0 - z) * F.logsigmoid(-x)
    w = _as_weights(weights, loss.shape, dtype, logits.device, fn)
    return _reduce(loss, w, reduction)


def weighted_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    pos_weight: torch.Tensor | float,
    weights: torch.Tensor | float | None = None,
    reduction: _Reduction = "mean",
) -> torch.Tensor:
    """Sigmoid cross-entropy with the positive term scaled by ``pos_weight``.

    Like TensorFlow's ``weighted_cross_entropy_with_logits`` (and the
    ``pos_weight`` of ``torch.nn.BCEWithLogitsLoss``): the element-wise loss is
    ``q * z * softplus(-x) + (1 - z) * softplus(x)`` with ``q = pos_weight``.
    ``q > 1`` trades precision for recall; ``q = 1`` is
    :func:`sigmoid_cross_entropy`.

    Args:
        logits: Unnormalised scores ``x``, any shape.
        labels: Targets ``z`` in [0, 1], same shape as ``logits``.
        pos_weight: Weight ``q`` of the positive term, a float or a tensor
            broadcastable to ``logits.shape`` (often one per class, shape ``(K,)``).
        weights: Weights broadcastable to ``logits.shape``, or None.
        reduction: ``"mean"`` (``sum(w * loss) / sum(w)`` over elements),
            ``"sum"`` or ``"none"`` (shape ``logits.shape``).

    Returns:
        The loss in ``float32`` for half-precision or ``float32`` logits,
        ``float64`` for ``float64`` logits; 0-d unless ``reduction="none"``.

    Raises:
        ValueError: ``reduction`` is invalid.
        DataError: ``labels``, ``pos_weight`` or ``weights`` do not match the
            logits' shape.
    """
    fn = "weighted_cross_entropy"
    _check_reduction(reduction)
    _check_logits(logits, fn)
    _check_tensor(labels, "labels", fn)
    if labels.shape != logits.shape:
        raise DataError(
            f"{fn}: input 'labels' must have the same shape as 'logits' "
            f"{tuple(logits.shape)}; got {tuple(labels.shape)}. Give one target "
            f"in [0, 1] per logit."
        )
    dtype = _compute_dtype(logits)
    q = torch.as_tensor(pos_weight, device=logits.device)
    try:
        shape = torch.broadcast_shapes(q.shape, logits.shape)
    except RuntimeError:
        shape = None
    if shape != logits.shape:
        raise DataError(
            f"{fn}: argument 'pos_weight' with shape {tuple(q.shape)} does not "
            f"broadcast to the logits' shape {tuple(logits.shape)}. Pass a float "
            f"or one weight per class, shape ({logits.shape[-1] if logits.dim() else 1},)."
        )
    x = logits.to(dtype)
    z = labels.to(dtype)
    loss = -q.to(dtype) * z * F.logsigmoid(x) - (1.0 - z) * F.logsigmoid(-x)
    w = _as_weights(weights, loss.shape, dtype, logits.device, fn)
    return _reduce(loss, w, reduction)


def kl_divergence(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    weights: torch.Tensor | float | None = None,
    reduction: _Reduction = "mean",
    dim: int = -1,
) -> torch.Tensor:
    """KL divergence ``KL(labels || softmax(logits))`` along the class dimension.

    The per-example loss is ``sum_c y_c * (log y_c - log_softmax(logits)_c)``
    with ``0 * log 0 = 0``. It equals :func:`softmax_cross_entropy` minus the
    labels' entropy ``H(y)``; for one-hot labels ``H(y) = 0`` and the two agree.
    Gradients with respect to ``labels`` stay finite where a label is 0.

    Args:
        logits: Unnormalised scores, shape ``(..., C, ...)`` with classes on ``dim``.
        labels: Probability distributions ``y`` (non-negative, summing to 1 over
            ``dim``; not checked), same shape as ``logits``.
        weights: Per-example weights broadcastable to the batch shape
            (``logits.shape`` without ``dim``), or None.
        reduction: ``"mean"`` (``sum(w * loss) / sum(w)``), ``"sum"`` or
            ``"none"`` (weighted per-example losses of the batch shape).
        dim: The class dimension.

    Returns:
        The loss in ``float32`` for half-precision or ``float32`` logits,
        ``float64`` for ``float64`` logits; 0-d unless ``reduction="none"``.

    Raises:
        ValueError: ``reduction`` or ``dim`` is invalid.
        DataError: ``labels`` or ``weights`` do not match the logits' shape.
    """
    fn = "kl_divergence"
    _check_reduction(reduction)
    _check_logits(logits, fn)
    _check_tensor(labels, "labels", fn)
    dim = _class_dim(logits, dim, fn)
    if labels.shape != logits.shape:
        raise DataError(
            f"{fn}: input 'labels' must have the same shape as 'logits' "
            f"{tuple(logits.shape)}; got {tuple(labels.shape)}. Give a probability "
            f"distribution over the classes for every example."
        )
    dtype = _compute_dtype(logits)
    logp = torch.log_softmax(logits.to(dtype), dim=dim)
    y = labels.to(dtype)
    positive = y > 0
    # Double where: log is only ever taken of positive values, so neither the
    # value nor the gradient sees log(0).
    log_y = torch.log(torch.where(positive, y, torch.ones_like(y)))
    terms = torch.where(positive, y * (log_y - logp), torch.zeros_like(y))
    loss = terms.sum(dim=dim)
    w = _as_weights(weights, loss.shape, dtype, logits.device, fn)
    return _reduce(loss, w, reduction)


# --------------------------------------------------------------------------- #
# Modules
# --------------------------------------------------------------------------- #


class SoftmaxCrossEntropy(nn.Module):
    """Module form of :func:`softmax_cross_entropy` (dense or soft labels).

    Args:
        label_smoothing: Mass in [0, 1] spread uniformly over the classes.
        reduction: ``"mean"`` (weighted mean), ``"sum"`` or ``"none"``.
        dim: The class dimension.
    """

    def __init__(
        self, *, label_smoothing: float = 0.0, reduction: _Reduction = "mean", dim: int = -1
    ) -> None:
        super().__init__()
        _check_reduction(reduction)
        _check_label_smoothing(label_smoothing)
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        self.dim = dim

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            logits: Unnormalised scores, ``(..., C)`` with classes on ``self.dim``.
            labels: Distributions over the classes, same shape as ``logits``.
            weights: Per-example weights, batch shape ``(...)``, or None.

        Returns:
            The reduced loss (0-d) or per-example losses ``(...)``.
        """
        return softmax_cross_entropy(
            logits,
            labels,
            weights=weights,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            dim=self.dim,
        )

    def extra_repr(self) -> str:
        return (
            f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, "
            f"dim={self.dim}"
        )


class SparseSoftmaxCrossEntropy(nn.Module):
    """Module form of :func:`sparse_softmax_cross_entropy` (integer labels).

    Args:
        label_smoothing: Mass in [0, 1] spread uniformly over the classes.
        ignore_index: Label value that marks an example to skip.
        reduction: ``"mean"`` (weighted mean over kept examples), ``"sum"`` or
            ``"none"``.
    """

    def __init__(
        self,
        *,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: _Reduction = "mean",
    ) -> None:
        super().__init__()
        _check_reduction(reduction)
        _check_label_smoothing(label_smoothing)
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = int(ignore_index)
        self.reduction = reduction

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            logits: Unnormalised scores, ``(..., C)``.
            labels: Integer class indices, ``(...)``.
            weights: Per-example weights, ``(...)``, or None.

        Returns:
            The reduced loss (0-d) or per-example losses ``(...)``.
        """
        return sparse_softmax_cross_entropy(
            logits,
            labels,
            weights=weights,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"label_smoothing={self.label_smoothing}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}"
        )


class SigmoidCrossEntropy(nn.Module):
    """Module form of :func:`sigmoid_cross_entropy` (multi-label, element-wise).

    Args:
        label_smoothing: Amount in [0, 1] pulling the targets towards 0.5.
        reduction: ``"mean"`` (weighted mean over elements), ``"sum"`` or ``"none"``.
    """

    def __init__(self, *, label_smoothing: float = 0.0, reduction: _Reduction = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        _check_label_smoothing(label_smoothing)
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            logits: Unnormalised scores, any shape, e.g. ``(B, K)``.
            labels: Targets in [0, 1], same shape as ``logits``.
            weights: Weights broadcastable to ``logits.shape``, or None.

        Returns:
            The reduced loss (0-d) or element-wise losses of ``logits.shape``.
        """
        return sigmoid_cross_entropy(
            logits,
            labels,
            weights=weights,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}"


class WeightedCrossEntropy(nn.Module):
    """Module form of :func:`weighted_cross_entropy` (sigmoid CE with ``pos_weight``).

    A tensor ``pos_weight`` is registered as a buffer, so it follows the module
    through ``.to(device)`` and into its ``state_dict``.

    Args:
        pos_weight: Weight of the positive term, a float or a tensor
            broadcastable to the logits' shape (often ``(K,)``).
        reduction: ``"mean"`` (weighted mean over elements), ``"sum"`` or ``"none"``.
    """

    pos_weight: torch.Tensor

    def __init__(self, *, pos_weight: torch.Tensor | float, reduction: _Reduction = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        q = torch.as_tensor(pos_weight, dtype=torch.get_default_dtype())
        self.register_buffer("pos_weight", q)
        self.reduction = reduction

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            logits: Unnormalised scores, any shape, e.g. ``(B, K)``.
            labels: Targets in [0, 1], same shape as ``logits``.
            weights: Weights broadcastable to ``logits.shape``, or None.

        Returns:
            The reduced loss (0-d) or element-wise losses of ``logits.shape``.
        """
        return weighted_cross_entropy(
            logits,
            labels,
            pos_weight=self.pos_weight,
            weights=weights,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"pos_weight shape={tuple(self.pos_weight.shape)}, reduction={self.reduction!r}"


class KLDivergence(nn.Module):
    """Module form of :func:`kl_divergence`, ``KL(labels || softmax(logits))``.

    Args:
        reduction: ``"mean"`` (weighted mean), ``"sum"`` or ``"none"``.
        dim: The class dimension.
    """

    def __init__(self, *, reduction: _Reduction = "mean", dim: int = -1) -> None:
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction
        self.dim = dim

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            logits: Unnormalised scores, ``(..., C)`` with classes on ``self.dim``.
            labels: Distributions over the classes, same shape as ``logits``.
            weights: Per-example weights, batch shape ``(...)``, or None.

        Returns:
            The reduced loss (0-d) or per-example losses ``(...)``.
        """
        return kl_divergence(
            logits, labels, weights=weights, reduction=self.reduction, dim=self.dim
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, dim={self.dim}"
