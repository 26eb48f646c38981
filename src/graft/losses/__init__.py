"""``graft.losses``: the maximum-likelihood loss family.

Every loss is the negative log-likelihood of the labels under a probability model whose
parameters are the network's outputs, so minimising it is maximum-likelihood estimation
(``docs/mle.md`` derives each one):

* :class:`SoftmaxCrossEntropy` / :class:`SparseSoftmaxCrossEntropy`: a categorical model,
  ``p = softmax(logits)``; labels are a distribution (dense) or a class index (sparse).
* :class:`SigmoidCrossEntropy` / :class:`WeightedCrossEntropy`: independent Bernoulli
  models, ``p = sigmoid(logits)``, one per element (multi-label).
* :class:`KLDivergence`: ``KL(labels || softmax(logits))``.

Each class derives from :class:`Loss`, which owns the weights and the reduction; each has a
function form (``softmax_cross_entropy(labels=..., logits=...)``). ``labels`` and ``logits``
are keyword-only wherever their order could be confused (see :mod:`graft.losses.base`).
"""

from graft.losses.base import Loss
from graft.losses.kl import KLDivergence, kl_divergence
from graft.losses.sigmoid import (
    SigmoidCrossEntropy,
    WeightedCrossEntropy,
    sigmoid_cross_entropy,
    weighted_cross_entropy,
)
from graft.losses.softmax import (
    SoftmaxCrossEntropy,
    SparseSoftmaxCrossEntropy,
    softmax_cross_entropy,
    sparse_softmax_cross_entropy,
)

__all__ = [
    "KLDivergence",
    "Loss",
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
