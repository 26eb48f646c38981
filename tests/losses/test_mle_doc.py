"""Runs the snippet in docs/mle.md and checks its numbers against NumPy."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "mle.md"
EXPECTED_KEYS = {
    "nll",
    "sparse_ce",
    "softmax_ce_one_hot",
    "kl_one_hot",
    "softmax_ce_soft",
    "entropy_soft",
    "kl_soft",
    "entropy_plus_kl",
    "sigmoid_ce",
    "extreme_ce",
    "fitted_probs",
    "class_frequencies",
}


def _fences(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def _parse(output: str) -> dict[str, np.ndarray]:
    values = {}
    for line in output.strip().splitlines():
        key, _, rest = line.partition(" = ")
        values[key.strip()] = np.array([float(v) for v in rest.split(",")])
    return values


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _xlogx(p: np.ndarray) -> np.ndarray:
    return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)


@pytest.fixture(scope="module")
def run() -> tuple[dict[str, np.ndarray], dict]:
    snippets = _fences("python")
    assert len(snippets) == 1, "docs/mle.md should hold exactly one ```python snippet"
    namespace: dict = {"__name__": "mle_doc_snippet"}
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(compile(snippets[0], str(DOC), "exec"), namespace)  # noqa: S102 - our own doc
    return _parse(buffer.getvalue()), namespace


@pytest.fixture(scope="module")
def reference(run) -> dict[str, np.ndarray]:
    _, ns = run
    x = ns["logits"].double().numpy()
    classes = ns["classes"].numpy()
    soft = ns["soft"].double().numpy()
    targets = ns["targets"].double().numpy()
    data = ns["data"].numpy()
    logq = _log_softmax(x)
    nll = -logq[np.arange(len(classes)), classes].mean()
    ce_soft = -(soft * logq).sum(-1).mean()
    entropy = -_xlogx(soft).sum(-1).mean()
    kl = (_xlogx(soft) - np.where(soft > 0, soft * logq, 0.0)).sum(-1).mean()
    # -log sigmoid(t) = log(1 + exp(-t)) = logaddexp(0, -t)
    bce = (targets * np.logaddexp(0, -x) + (1 - targets) * np.logaddexp(0, x)).mean()
    # The MLE of a categorical distribution is the vector of class frequencies.
    freqs = np.bincount(data) / len(data)
    return {
        "nll": nll,
        "sparse_ce": nll,
        "softmax_ce_one_hot": nll,
        "kl_one_hot": nll,
        "softmax_ce_soft": ce_soft,
        "entropy_soft": entropy,
        "kl_soft": kl,
        "entropy_plus_kl": ce_soft,
        "sigmoid_ce": bce,
        "extreme_ce": 2e4,
        "fitted_probs": freqs,
        "class_frequencies": freqs,
    }


def _atol(key: str) -> float:
    # The snippet prints 6 decimals, probabilities 4, the extreme loss 1.
    return {"fitted_probs": 1e-4, "class_frequencies": 1e-4, "extreme_ce": 0.05}.get(key, 2e-6)


def test_snippet_prints_every_number(run):
    printed, _ = run
    assert set(printed) == EXPECTED_KEYS


def test_snippet_numbers_match_numpy(run, reference):
    printed, _ = run
    for key, want in reference.items():
        np.testing.assert_allclose(
            printed[key], np.atleast_1d(want), rtol=0, atol=_atol(key), err_msg=key
        )


def test_shown_output_matches_reference(reference):
    blocks = _fences("text")
    assert len(blocks) == 1, "docs/mle.md should show the snippet's output in one ```text block"
    shown = _parse(blocks[0])
    assert set(shown) == EXPECTED_KEYS
    for key, want in reference.items():
        np.testing.assert_allclose(
            shown[key], np.atleast_1d(want), rtol=0, atol=_atol(key), err_msg=key
        )
