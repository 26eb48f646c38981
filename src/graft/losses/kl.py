"""KL divergence ``KL(labels || softmax(logits))``: softmax cross-entropy minus a constant.

It differs from :class:`~graft.losses.SoftmaxCrossEntropy` only by the labels' entropy, a
constant in the logits, so it has the same minimiser and the same gradient in the logits.
"""

from __future__ import annotations

import torch

from graft.losses.base import Loss, Reduction, check_same_shape, class_dim, compute_dtype

__all__ = ["KLDivergence", "kl_divergence"]


class KLDivergence(Loss):
    """``sum_c y_c * (log y_c - log_softmax(logits)_c)`` along the class dimension.

    ``0 * log 0`` is 0, and gradients with respect to ``labels`` stay finite where a label is
    0. For one-hot labels it equals the softmax cross-entropy. Call as
    ``loss(labels=y, logits=x, weights=None)``; ``y`` has the shape of ``x``.

    Args:
        reduction: ``"mean"`` (weighted mean), ``"sum"`` or ``"none"``.
        dim: The class dimension.
    """

    name = "kl_divergence"

    def __init__(self, *, reduction: Reduction = "mean", dim: int = -1) -> None:
        super().__init__(reduction=reduction)
        self.dim = dim

    def per_example(self, labels: torch.Tensor,
                    logits: torch.Tensor) -> tuple[torch.Tensor, None]:
        dim = class_dim(logits, self.dim, self.name)
        check_same_shape(labels, logits, self.name, "Give a probability distribution over "
                         "the classes for every example.")
        dtype = compute_dtype(logits)
        logp = torch.log_softmax(logits.to(dtype), dim=dim)
        y = labels.to(dtype)
        positive = y > 0
        # Double where: log only ever sees positive values, in the value and the gradient.
        log_y = torch.log(torch.where(positive, y, torch.ones_like(y)))
        terms = torch.where(positive, y * (log_y - logp), torch.zeros_like(y))
        return terms.sum(dim=dim), None

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, dim={self.dim}"


def kl_divergence(*, labels: torch.Tensor, logits: torch.Tensor,
                  weights: torch.Tensor | float | None = None, reduction: Reduction = "mean",
                  dim: int = -1) -> torch.Tensor:
    """Function form of :class:`KLDivergence`; ``labels`` and ``logits`` by keyword.

    Raises:
        ValueError: ``reduction`` or ``dim`` is invalid.
        DataError: ``labels`` or ``weights`` do not match the logits' shape.
    """
    return KLDivergence(reduction=reduction, dim=dim)(labels=labels, logits=logits,
                                                      weights=weights)
