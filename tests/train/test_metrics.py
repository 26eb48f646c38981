"""Classification metrics against an independent float64 NumPy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graft.errors import DataError
from graft.train.metrics import ClassificationMetrics, check_metrics

NAMES = ("accuracy", "top2", "top9", "confusion_matrix")


def _np_reference(logits: np.ndarray, labels: np.ndarray) -> dict:
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    order = np.argsort(-logits, axis=-1)
    classes = logits.shape[-1]
    confusion = np.zeros((classes, classes), dtype=np.int64)
    for y, p in zip(labels, logits.argmax(-1)):
        confusion[y, p] += 1
    return {
        "loss": float(-logp[np.arange(len(labels)), labels].mean()),
        "accuracy": float((logits.argmax(-1) == labels).mean()),
        "top2": float((order[:, :2] == labels[:, None]).any(-1).mean()),
        "top9": 1.0,  # more than the 5 classes: every example counts
        "confusion_matrix": confusion,
    }


def _batches(logits: torch.Tensor, labels: torch.Tensor, size: int):
    for i in range(0, len(labels), size):
        yield logits[i:i + size], labels[i:i + size]


def _check(result: dict, ref: dict, examples: int) -> None:
    assert result["examples"] == examples
    assert result["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    for key in ("accuracy", "top2", "top9"):
        assert result[key] == pytest.approx(ref[key], abs=1e-12), key
    np.testing.assert_array_equal(result["confusion_matrix"].numpy(), ref["confusion_matrix"])
    assert result["confusion_matrix"].dtype == torch.int64


def test_counts_match_numpy_with_a_short_last_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(103, 5, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 5, (103,), generator=g)
    metrics = ClassificationMetrics(NAMES)
    for lg, lb in _batches(logits, labels, 10):
        loss = torch.nn.functional.cross_entropy(lg, lb)
        metrics.update(lg, lb, loss)
    _check(metrics.compute(), _np_reference(logits.numpy(), labels.numpy()), 103)


def test_two_shards_summed_count_every_example_once():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (50,), generator=g)
    shards = [list(range(50))[r::2] for r in range(2)]
    packed = {}

    def run(rank: int, reduce) -> dict:
        m = ClassificationMetrics(NAMES)
        idx = torch.tensor(shards[rank])
        for lg, lb in _batches(logits[idx], labels[idx], 7):
            m.update(lg, lb, torch.nn.functional.cross_entropy(lg, lb))
        return m.compute(reduce)

    def capture(t):
        packed["other"] = t.clone()
        return t

    run(1, capture)
    result = run(0, lambda t: t + packed["other"])
    _check(result, _np_reference(logits.numpy(), labels.numpy()), 50)


def test_loss_only_without_metrics():
    m = ClassificationMetrics(())
    m.update(torch.randn(4, 3), torch.rand(4, 3), torch.tensor(2.0))
    m.update(torch.randn(2, 3), torch.rand(2, 3), torch.tensor(5.0))
    assert m.compute() == {"loss": pytest.approx(3.0), "examples": 6}


def test_bad_labels_and_names():
    m = ClassificationMetrics(("accuracy",))
    with pytest.raises(DataError, match="integer class labels"):
        m.update(torch.randn(2, 3), torch.rand(2), torch.tensor(1.0))
    with pytest.raises(DataError, match="outside"):
        m.update(torch.randn(2, 3), torch.tensor([0, 3]), torch.tensor(1.0))
    with pytest.raises(DataError, match="shape"):
        m.update(torch.randn(2, 3), torch.tensor([[0], [1]]), torch.tensor(1.0))
    for bad in ("f1", "top0", "top", 3):
        with pytest.raises(ValueError, match="unknown metric"):
            check_metrics([bad])
    assert check_metrics("top5") == ("top5",)
    assert check_metrics(["accuracy", "accuracy"]) == ("accuracy",)
