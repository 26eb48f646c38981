"""Tests for graft.losses against an independent float64 NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from graft.errors import DataError
from graft import losses
from graft.losses import (
    KLDivergence,
    SigmoidCrossEntropy,
    SoftmaxCrossEntropy,
    SparseSoftmaxCrossEntropy,
    WeightedCrossEntropy,
    kl_divergence,
    sigmoid_cross_entropy,
    softmax_cross_entropy,
    sparse_softmax_cross_entropy,
    weighted_cross_entropy,
)

REDUCTIONS = ("mean", "sum", "none")
SCALES = (3.0, 1e4)  # ordinary logits, and extreme ones that overflow a naive exp


# --------------------------------------------------------------------------- #
# Float64 NumPy reference
# --------------------------------------------------------------------------- #


def np_log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def np_log_sigmoid(x: np.ndarray) -> np.ndarray:
    # log sigmoid(x) = -log(1 + exp(-x)); logaddexp is exact for any finite x.
    return -np.logaddexp(0.0, -x)


def np_reduce(loss, weights, reduction, keep=None):
    w = np.ones_like(loss) if weights is None else np.broadcast_to(weights, loss.shape)
    if keep is not None:
        w = np.where(keep, w, 0.0)
        loss = np.where(keep, loss, 0.0)
    if reduction == "none":
        return w * loss
    if reduction == "sum":
        return np.sum(w * loss)
    denom = np.sum(w)
    return np.sum(w * loss) / denom if denom != 0 else 0.0


def ref_softmax_ce(x, y, weights=None, eps=0.0, reduction="mean", axis=-1):
    c = x.shape[axis]
    y = (1 - eps) * y + eps / c
    loss = -(y * np_log_softmax(x, axis)).sum(axis=axis)
    return np_reduce(loss, weights, reduction)


def ref_sparse_ce(x, labels, weights=None, eps=0.0, ignore_index=-100, reduction="mean"):
    keep = labels != ignore_index
    logp = np_log_softmax(x)
    safe = np.where(keep, labels, 0)
    nll = -np.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    smooth = -logp.mean(axis=-1)
    loss = (1 - eps) * nll + eps * smooth
    return np_reduce(loss, weights, reduction, keep)


def ref_sigmoid_ce(x, z, weights=None, eps=0.0, reduction="mean"):
    z = (1 - eps) * z + eps / 2
    loss = -(z * np_log_sigmoid(x) + (1 - z) * np_log_sigmoid(-x))
    return np_reduce(loss, weights, reduction)


def ref_weighted_ce(x, z, q, weights=None, reduction="mean"):
    # TensorFlow's documented stable form of weighted_cross_entropy_with_logits.
    l = 1 + (q - 1) * z
    loss = (1 - z) * x + l * (np.log1p(np.exp(-np.abs(x))) + np.maximum(-x, 0))
    return np_reduce(loss, weights, reduction)


def ref_kl(x, y, weights=None, reduction="mean", axis=-1):
    logq = np_log_softmax(x, axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(y > 0, y * (np.log(np.where(y > 0, y, 1.0)) - logq), 0.0)
    return np_reduce(terms.sum(axis=axis), weights, reduction)


def ref_entropy(y, axis=-1):
    return -np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0)), 0.0).sum(axis=axis)


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def check(actual: torch.Tensor, expected, **tol) -> None:
    expected = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    assert torch.isfinite(actual).all(), actual
    assert_close(actual.to(torch.float64), expected, **tol)


# --------------------------------------------------------------------------- #
# Inputs
# --------------------------------------------------------------------------- #

B, C = 6, 5


def make_logits(scale: float, shape=(B, C), seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if scale >= 1e3:
        # Mix of +-scale and small values: softmax saturates, exp overflows.
        signs = torch.randint(0, 2, shape, generator=gen) * 2 - 1
        x = signs * scale + torch.randn(shape, generator=gen)
    else:
        x = scale * torch.randn(shape, generator=gen)
    return x.to(dtype)


def make_soft_labels(shape=(B, C), seed: int = 1, zeros: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(shape, generator=gen) + 0.05
    if zeros:
        p = p * (torch.rand(shape, generator=gen) > 0.4)
        p[..., 0] += 0.1  # no all-zero row
    return p / p.sum(-1, keepdim=True)


def make_weights(shape=(B,), seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) * 2


# Tolerances for float32 against float64: losses reach 2e4 at extreme logits.
TOL32 = {"rtol": 2e-6, "atol": 1e-4}


# --------------------------------------------------------------------------- #
# Values against the reference
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("use_weights", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_softmax_cross_entropy_matches_reference(reduction, scale, use_weights, eps):
    x, y = make_logits(scale), make_soft_labels()
    w = make_weights() if use_weights else None
    got = softmax_cross_entropy(logits=x, labels=y, weights=w, label_smoothing=eps, reduction=reduction)
    want = ref_softmax_ce(as_np(x), as_np(y), None if w is None else as_np(w), eps, reduction)
    assert got.dtype == torch.float32
    check(got, want, **TOL32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softmax_cross_entropy_class_dim(reduction):
    x = make_logits(3.0, shape=(3, C, 4))
    y = make_soft_labels(shape=(3, 4, C)).transpose(1, 2)
    w = make_weights(shape=(3, 4))
    got = softmax_cross_entropy(logits=x, labels=y, weights=w, reduction=reduction, dim=1)
    want = ref_softmax_ce(as_np(x), as_np(y), as_np(w), 0.0, reduction, axis=1)
    check(got, want, **TOL32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("use_weights", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_sparse_softmax_cross_entropy_matches_reference(
    reduction, scale, use_weights, eps, ignore_index
):
    x = make_logits(scale)
    # With ignore_index=3 the -100 is out of range, so use labels valid for both.
    labels = torch.tensor([0, 4, ignore_index, 2, 3 if ignore_index == -100 else 1, 3])
    w = make_weights() if use_weights else None
    got = sparse_softmax_cross_entropy(
        x, labels, weights=w, label_smoothing=eps, ignore_index=ignore_index, reduction=reduction
    )
    w_np = None if w is None else as_np(w)
    want = ref_sparse_ce(as_np(x), labels.numpy(), w_np, eps, ignore_index, reduction)
    check(got, want, **TOL32)


def test_sparse_ignore_index_excluded_from_mean():
    x = make_logits(3.0)
    labels = torch.tensor([0, 4, -100, 2, -100, 1])
    kept = labels != -100
    got = sparse_softmax_cross_entropy(x, labels)
    # The mean of the kept rows alone: ignored rows are not in the denominator.
    want = ref_sparse_ce(as_np(x[kept]), labels[kept].numpy())
    check(got, want, **TOL32)
    per_example = sparse_softmax_cross_entropy(x, labels, reduction="none")
    assert (per_example[~kept] == 0).all()


def test_sparse_all_ignored_mean_is_zero_with_finite_grad():
    x = make_logits(3.0).requires_grad_()
    labels = torch.full((B,), -100)
    loss = sparse_softmax_cross_entropy(x, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert_close(x.grad, torch.zeros_like(x))


def test_zero_weights_and_empty_batch_mean_is_zero():
    x = make_logits(3.0)
    assert softmax_cross_entropy(logits=x, labels=make_soft_labels(), weights=torch.zeros(B)).item() == 0.0
    empty = torch.zeros(0, C)
    assert softmax_cross_entropy(logits=empty, labels=empty).item() == 0.0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("weights_shape", [None, (B, 1), (B, C)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_sigmoid_cross_entropy_matches_reference(reduction, scale, weights_shape, eps):
    x = make_logits(scale)
    z = torch.rand((B, C), generator=torch.Generator().manual_seed(5))
    w = None if weights_shape is None else make_weights(weights_shape)
    got = sigmoid_cross_entropy(logits=x, labels=z, weights=w, label_smoothing=eps, reduction=reduction)
    want = ref_sigmoid_ce(as_np(x), as_np(z), None if w is None else as_np(w), eps, reduction)
    check(got, want, **TOL32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("pos_weight", [2.5, "per_class"])
@pytest.mark.parametrize("use_weights", [False, True])
def test_weighted_cross_entropy_matches_reference(reduction, scale, pos_weight, use_weights):
    x = make_logits(scale)
    z = (torch.rand((B, C), generator=torch.Generator().manual_seed(6)) > 0.5).float()
    q = torch.linspace(0.5, 4.0, C) if pos_weight == "per_class" else pos_weight
    w = make_weights((B, 1)) if use_weights else None
    got = weighted_cross_entropy(logits=x, labels=z, pos_weight=q, weights=w, reduction=reduction)
    q_np = as_np(q) if isinstance(q, torch.Tensor) else q
    want = ref_weighted_ce(as_np(x), as_np(z), q_np, None if w is None else as_np(w), reduction)
    check(got, want, **TOL32)


def test_weighted_cross_entropy_agrees_with_torch_and_sigmoid():
    x, z = make_logits(3.0), torch.rand(B, C, generator=torch.Generator().manual_seed(7))
    q = torch.linspace(0.5, 4.0, C)
    assert_close(
        weighted_cross_entropy(logits=x, labels=z, pos_weight=q),
        F.binary_cross_entropy_with_logits(x, z, pos_weight=q),
    )
    assert_close(weighted_cross_entropy(logits=x, labels=z, pos_weight=1.0), sigmoid_cross_entropy(logits=x, labels=z))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("use_weights", [False, True])
def test_kl_divergence_matches_reference(reduction, scale, use_weights):
    x, y = make_logits(scale), make_soft_labels(zeros=True)
    assert (y == 0).any()  # exercises 0 * log 0 = 0
    w = make_weights() if use_weights else None
    got = kl_divergence(logits=x, labels=y, weights=w, reduction=reduction)
    want = ref_kl(as_np(x), as_np(y), None if w is None else as_np(w), reduction)
    check(got, want, **TOL32)


# --------------------------------------------------------------------------- #
# Half precision at extreme logits
# --------------------------------------------------------------------------- #

LOSS_NAMES = ("kl", "sigmoid", "softmax", "sparse", "weighted")


def loss_and_reference(name, x, y, yi, z):
    """One loss at (x, y | yi | z), and its float64 NumPy reference."""
    xs = as_np(x)
    if name == "softmax":
        got = softmax_cross_entropy(logits=x, labels=y, label_smoothing=0.1)
        return got, ref_softmax_ce(xs, as_np(y), eps=0.1)
    if name == "sparse":
        got = sparse_softmax_cross_entropy(x, yi, label_smoothing=0.1)
        return got, ref_sparse_ce(xs, yi.numpy(), eps=0.1)
    if name == "sigmoid":
        return sigmoid_cross_entropy(logits=x, labels=z), ref_sigmoid_ce(xs, as_np(z))
    if name == "weighted":
        return weighted_cross_entropy(logits=x, labels=z, pos_weight=3.0), ref_weighted_ce(xs, as_np(z), 3.0)
    return kl_divergence(logits=x, labels=y), ref_kl(xs, as_np(y))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_half_precision_extreme_logits(dtype, name):
    x = make_logits(1e4, dtype=dtype).requires_grad_()
    # Labels in the same half dtype, as a mixed-precision model would produce them.
    y = make_soft_labels(zeros=True).to(dtype)
    yi = torch.tensor([0, 4, 1, 2, 3, 1])
    z = (torch.rand(B, C, generator=torch.Generator().manual_seed(8)) > 0.5).to(dtype)
    got, want = loss_and_reference(name, x, y, yi, z)
    assert got.dtype == torch.float32
    # The reference sees the very same (rounded) half-precision inputs in float64,
    # so only float32 arithmetic separates the two.
    check(got, want, rtol=1e-5, atol=1e-3)
    got.backward()
    assert x.grad.dtype == dtype
    assert torch.isfinite(x.grad).all()


def test_half_precision_per_example_sum_does_not_overflow():
    # 64 examples of loss 2e4 each sum past float16's max (65504).
    x = torch.tensor([[1e4, -1e4]] * 64, dtype=torch.float16)
    labels = torch.ones(64, dtype=torch.long)
    got = sparse_softmax_cross_entropy(x, labels, reduction="sum")
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(64 * 2e4)


# --------------------------------------------------------------------------- #
# Gradients
# --------------------------------------------------------------------------- #


def _f64(t: torch.Tensor, grad: bool = True) -> torch.Tensor:
    return t.to(torch.float64).requires_grad_(grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradcheck(name, reduction):
    # Gradients with respect to logits, labels, weights and pos_weight alike.
    x = _f64(make_logits(2.0, shape=(3, 4)))
    y = _f64(make_soft_labels(shape=(3, 4)))
    w = _f64(make_weights(shape=(3,)))
    z = _f64(torch.rand(3, 4, generator=torch.Generator().manual_seed(9)))
    q = _f64(torch.tensor([0.5, 1.0, 2.0, 3.0]))
    yi = torch.tensor([1, -100, 3])
    opts = {"reduction": reduction}
    if name == "softmax":
        def fn(x, y, w):
            return softmax_cross_entropy(logits=x, labels=y, weights=w, label_smoothing=0.1, **opts)
        inputs = (x, y, w)
    elif name == "sparse":
        def fn(x, w):
            return sparse_softmax_cross_entropy(x, yi, weights=w, label_smoothing=0.1, **opts)
        inputs = (x, w)
    elif name == "sigmoid":
        def fn(x, z, w):
            return sigmoid_cross_entropy(logits=x, labels=z, weights=w[:, None], label_smoothing=0.1, **opts)
        inputs = (x, z, w)
    elif name == "weighted":
        def fn(x, z, q, w):
            return weighted_cross_entropy(logits=x, labels=z, pos_weight=q, weights=w[:, None], **opts)
        inputs = (x, z, q, w)
    else:
        def fn(x, y, w):
            return kl_divergence(logits=x, labels=y, weights=w, **opts)
        inputs = (x, y, w)
    assert torch.autograd.gradcheck(fn, inputs)


def test_kl_gradient_finite_where_labels_are_zero():
    x = _f64(make_logits(2.0))
    y = _f64(make_soft_labels(zeros=True))
    kl_divergence(logits=x, labels=y).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


def test_gradient_at_extreme_logits_is_exact():
    # d CE / d logits = softmax(logits) - y: here exactly [1, -1, 0] per row.
    x = torch.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
    sparse_softmax_cross_entropy(x, torch.tensor([1]), reduction="sum").backward()
    assert_close(x.grad, torch.tensor([[1.0, -1.0, 0.0]]))


# --------------------------------------------------------------------------- #
# Identities
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("scale", SCALES)
def test_cross_entropy_is_entropy_plus_kl(scale):
    x = make_logits(scale).double()
    p = make_soft_labels(zeros=True).double()
    ce = softmax_cross_entropy(logits=x, labels=p, reduction="none")
    kl = kl_divergence(logits=x, labels=p, reduction="none")
    h = torch.from_numpy(ref_entropy(p.numpy()))
    assert_close(ce, h + kl)


@pytest.mark.parametrize("scale", SCALES)
def test_one_hot_losses_all_equal_negative_log_likelihood(scale):
    x = make_logits(scale).double()
    labels = torch.tensor([0, 4, 1, 2, 3, 1])
    one_hot = F.one_hot(labels, C).double()
    probs_log = np_log_softmax(x.numpy())
    nll = -probs_log[np.arange(B), labels.numpy()]
    for reduction, want in [("none", nll), ("mean", nll.mean()), ("sum", nll.sum())]:
        want_t = torch.as_tensor(want)
        assert_close(softmax_cross_entropy(logits=x, labels=one_hot, reduction=reduction), want_t)
        assert_close(sparse_softmax_cross_entropy(x, labels, reduction=reduction), want_t)
        assert_close(kl_divergence(logits=x, labels=one_hot, reduction=reduction), want_t)
        assert_close(F.cross_entropy(x, labels, reduction=reduction), want_t)


def test_sparse_label_smoothing_equals_dense_smoothed():
    x = make_logits(3.0)
    labels = torch.tensor([0, 4, 1, 2, 3, 1])
    assert_close(
        sparse_softmax_cross_entropy(x, labels, label_smoothing=0.3, reduction="none"),
        softmax_cross_entropy(
            logits=x, labels=F.one_hot(labels, C).float(), label_smoothing=0.3, reduction="none"
        ),
    )


# --------------------------------------------------------------------------- #
# Modules
# --------------------------------------------------------------------------- #


def test_modules_match_functions():
    x, y, w = make_logits(3.0), make_soft_labels(), make_weights()
    yi = torch.tensor([0, 4, -1, 2, 3, 1])
    z = torch.rand(B, C, generator=torch.Generator().manual_seed(10))
    q = torch.linspace(0.5, 2.0, C)
    assert_close(
        SoftmaxCrossEntropy(label_smoothing=0.1, reduction="sum")(logits=x, labels=y, weights=w),
        softmax_cross_entropy(logits=x, labels=y, weights=w, label_smoothing=0.1, reduction="sum"),
    )
    assert_close(
        SparseSoftmaxCrossEntropy(label_smoothing=0.1, ignore_index=-1)(x, yi, w),
        sparse_softmax_cross_entropy(x, yi, weights=w, label_smoothing=0.1, ignore_index=-1),
    )
    assert_close(
        SigmoidCrossEntropy(reduction="none")(logits=x, labels=z),
        sigmoid_cross_entropy(logits=x, labels=z, reduction="none"),
    )
    assert_close(
        WeightedCrossEntropy(pos_weight=q)(logits=x, labels=z, weights=w[:, None]),
        weighted_cross_entropy(logits=x, labels=z, pos_weight=q, weights=w[:, None]),
    )
    assert_close(KLDivergence(dim=-1)(logits=x, labels=y, weights=w), kl_divergence(logits=x, labels=y, weights=w))


def test_weighted_module_keeps_pos_weight_as_buffer():
    module = WeightedCrossEntropy(pos_weight=torch.tensor([1.0, 2.0]))
    assert "pos_weight" in module.state_dict()
    assert_close(module.double().pos_weight, torch.tensor([1.0, 2.0], dtype=torch.float64))


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #

def call_with_reduction(name: str, reduction: str):
    """Call a loss function, or build a loss module, by name with `reduction`."""
    x, y = make_logits(1.0), make_soft_labels()
    extra = {"pos_weight": 1.0} if "eighted" in name else {}
    if name == "sparse_softmax_cross_entropy":
        labels = torch.zeros(B, dtype=torch.long)
        return sparse_softmax_cross_entropy(x, labels, reduction=reduction)
    if name[0].islower():
        return getattr(losses, name)(logits=x, labels=y, reduction=reduction, **extra)
    return getattr(losses, name)(reduction=reduction, **extra)


@pytest.mark.parametrize("name", losses.__all__)
def test_bad_reduction_raises_value_error(name):
    with pytest.raises(ValueError) as info:
        call_with_reduction(name, "avg")
    message = str(info.value)
    assert "reduction" in message and "'avg'" in message
    assert all(f"'{r}'" in message for r in REDUCTIONS)


DENSE_FUNCTIONS = [
    "kl_divergence",
    "sigmoid_cross_entropy",
    "softmax_cross_entropy",
    "weighted_cross_entropy",
]


@pytest.mark.parametrize("name", DENSE_FUNCTIONS)
def test_dense_label_shape_mismatch(name):
    fn = getattr(losses, name)
    kw = {"pos_weight": 1.0} if name == "weighted_cross_entropy" else {}
    x, y = make_logits(1.0), make_soft_labels(shape=(B, C + 1))
    x_before, y_before = x.clone(), y.clone()
    with pytest.raises(DataError, match=r"\(6, 5\).*\(6, 6\)"):
        fn(logits=x, labels=y, **kw)
    # Nothing is modified in place on the way to the error.
    assert torch.equal(x, x_before) and torch.equal(y, y_before)


def test_class_indices_to_dense_loss_point_to_sparse():
    with pytest.raises(DataError, match="sparse_softmax_cross_entropy"):
        softmax_cross_entropy(logits=make_logits(1.0), labels=torch.zeros(B))


def test_sparse_label_errors():
    x = make_logits(1.0)
    with pytest.raises(DataError, match=r"shape \(6,\).*\(6, 5\).*got \(5,\)"):
        sparse_softmax_cross_entropy(x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(DataError, match=r"integer class indices.*torch.float32"):
        sparse_softmax_cross_entropy(x, torch.zeros(B))
    with pytest.raises(DataError, match=r"class 5, outside \[0, 5\)"):
        sparse_softmax_cross_entropy(x, torch.tensor([0, 1, 5, 2, 3, 4]))
    with pytest.raises(DataError, match=r"class -1"):
        sparse_softmax_cross_entropy(x, torch.tensor([0, 1, -1, 2, 3, 4]))


def test_weights_shape_mismatch():
    with pytest.raises(DataError, match=r"'weights' with shape \(5,\).*batch shape \(6,\)"):
        softmax_cross_entropy(logits=make_logits(1.0), labels=make_soft_labels(), weights=torch.ones(5))
    with pytest.raises(DataError, match=r"\(6,\).*\(6, 5\)"):
        sigmoid_cross_entropy(logits=make_logits(1.0), labels=make_soft_labels(), weights=torch.ones(B))
    with pytest.raises(DataError, match=r"'pos_weight' with shape \(3,\)"):
        weighted_cross_entropy(logits=make_logits(1.0), labels=make_soft_labels(), pos_weight=torch.ones(3))


@pytest.mark.parametrize("eps", [-0.1, 1.5, "0.1"])
def test_bad_label_smoothing(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        softmax_cross_entropy(logits=make_logits(1.0), labels=make_soft_labels(), label_smoothing=eps)
    with pytest.raises(ValueError, match="label_smoothing"):
        SparseSoftmaxCrossEntropy(label_smoothing=eps)


def test_bad_dim_and_integer_logits():
    with pytest.raises(ValueError, match="'dim'.*dim=2"):
        softmax_cross_entropy(logits=make_logits(1.0), labels=make_soft_labels(), dim=2)
    with pytest.raises(DataError, match="floating-point.*float"):
        kl_divergence(logits=torch.zeros(B, C, dtype=torch.long), labels=make_soft_labels())


def test_all_is_sorted_and_complete():
    assert losses.__all__ == sorted(losses.__all__)
    defined = set()
    for module in ("kl", "sigmoid", "softmax"):
        sub = getattr(losses, module)
        assert all(getattr(sub, n).__module__ == sub.__name__ for n in sub.__all__)
        defined |= set(sub.__all__)
    assert set(losses.__all__) == defined | {"Loss"}


# --------------------------------------------------------------------------- #
# Argument order, ignore_index and the base class
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", DENSE_FUNCTIONS)
def test_dense_losses_refuse_positional_labels_and_logits(name):
    # A swapped positional call would compute a wrong number silently: TF passes
    # (labels, logits), torch (input, target). Keywords are the only spelling.
    kw = {"pos_weight": 1.0} if name == "weighted_cross_entropy" else {}
    x, y = make_logits(1.0), make_soft_labels()
    with pytest.raises(TypeError):
        getattr(losses, name)(x, y, **kw)
    with pytest.raises(TypeError):
        getattr(losses, name)(y, x, **kw)
    # Both keyword orders give the same number: order no longer matters.
    fn = getattr(losses, name)
    assert_close(fn(labels=y, logits=x, **kw), fn(logits=x, labels=y, **kw))


def test_dense_module_refuses_positional_arguments():
    x, y = make_logits(1.0), make_soft_labels()
    with pytest.raises(TypeError):
        SoftmaxCrossEntropy()(x, y)
    with pytest.raises(TypeError):
        SigmoidCrossEntropy()(x, y)


def test_sparse_in_tensorflow_order_is_a_clear_error():
    x, labels = make_logits(1.0), torch.tensor([0, 1, 2, 3, 4, 0])
    with pytest.raises(DataError, match="floating-point.*labels= and logits= by keyword"):
        sparse_softmax_cross_entropy(labels, x)
    assert_close(sparse_softmax_cross_entropy(labels=labels, logits=x),
                 sparse_softmax_cross_entropy(x, labels))


def test_ignore_index_default_is_torch_minus_100_and_none_refuses_it():
    x = make_logits(3.0)
    labels = torch.tensor([0, -100, 1, 2, -100, 4])
    keep = labels != -100
    want = F.cross_entropy(x[keep], labels[keep])
    assert_close(sparse_softmax_cross_entropy(x, labels), want)
    with pytest.raises(DataError, match=r"class -100.*ignore_index=None"):
        sparse_softmax_cross_entropy(x, labels, ignore_index=None)
    with pytest.raises(DataError, match=r"class -100"):
        sparse_softmax_cross_entropy(x, labels, ignore_index=None, weights=torch.ones(B))


def test_every_loss_module_derives_from_one_base_that_owns_reduction():
    classes = [getattr(losses, n) for n in losses.__all__ if n[0].isupper() and n != "Loss"]
    assert classes and all(issubclass(c, losses.Loss) for c in classes)
    # Subclasses write the formula only: none re-implements compute (weights + reduction).
    assert all("compute" not in vars(c) for c in classes)


def test_a_user_loss_gets_weights_and_reduction_from_the_base():
    class Squared(losses.Loss):
        name = "squared"

        def per_example(self, labels, logits):
            return ((logits - labels) ** 2).sum(-1), None

    x, y, w = make_logits(1.0), make_soft_labels(), make_weights()
    per = ((x - y) ** 2).sum(-1)
    assert_close(Squared()(labels=y, logits=x, weights=w), (w * per).sum() / w.sum())
    assert_close(Squared(reduction="sum")(labels=y, logits=x), per.sum())
    with pytest.raises(ValueError, match="reduction"):
        Squared(reduction="avg")
