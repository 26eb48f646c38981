"""``train_and_evaluate``: train, evaluate every so often, keep the best, export, stop early.

The same call on one CPU, several GPUs or several nodes (the Estimator's strategy decides).
After each evaluation the checkpoint of that step is copied to ``model_dir/best`` when its
metric is the best so far (``EvalSpec.keep_best``), every exporter of ``EvalSpec.exporters``
runs, and training stops early when ``EvalSpec.early_stopping``'s metric has not improved for
``patience`` evaluations. Bookkeeping lives in ``model_dir/train_and_evaluate.json``, so a
re-run with the same ``model_dir`` resumes training, early stopping and the exporters.

With ``evaluator="sidecar"`` the job only trains (checkpointing every ``eval_every`` steps,
keeping each checkpoint until it is evaluated) and writes ``model_dir/final.json`` at the
end; a ``graft evaluate --watch MODEL_DIR script.py`` process evaluates and exports (see
:mod:`graft.train.sidecar`).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from typing import Any, Iterator, Literal

from graft._fs import atomic_write
from graft.train.checkpoint import recover_directory, replace_directory, staging_directory
from graft.train.estimator import Estimator
from graft.train.specs import EvalSpec, TrainSpec

__all__ = ["train_and_evaluate"]

_log = logging.getLogger("graft.train")
_STATE_FILE = "train_and_evaluate.json"


def train_and_evaluate(estimator: Estimator, train_spec: TrainSpec, eval_spec: EvalSpec, *,
                       evaluator: Literal["inline", "sidecar"] = "inline") -> dict[str, Any]:
    """Train to ``train_spec.max_steps``, evaluating every ``train_spec.eval_every`` steps.

    Args:
        estimator: The Estimator to train.
        train_spec: What to train on and for how long.
        eval_spec: What to evaluate on, early stopping, best checkpoint and exporters.
        evaluator: ``"inline"`` evaluates in this job; ``"sidecar"`` leaves evaluation and
            exports to a ``graft evaluate --watch`` process (needs a ``model_dir``). In a
            process that ``graft evaluate --watch`` started, this call *is* the sidecar.

    Returns:
        The last evaluation's metrics (see :meth:`Estimator.evaluate`) with ``"best_step"``,
        ``"stopped_early"`` and ``"exported"`` (the records of the exports made by this call:
        exporter, handle, digest, step, metrics). With ``evaluator="sidecar"`` in the
        training job: ``{"step", "evaluator": "sidecar", "final": path of the marker}``.

    Raises:
        ValueError: the specs are not a TrainSpec and an EvalSpec, a metric named by
            ``eval_spec`` is not among the evaluation results, or the sidecar is asked for
            without a ``model_dir`` or with early stopping.
    """
    from graft.train import sidecar

    if not isinstance(estimator, Estimator):
        raise ValueError(f"estimator must be an Estimator; got {type(estimator).__name__}")
    if not isinstance(train_spec, TrainSpec):
        raise ValueError(f"train_spec must be a TrainSpec; got {type(train_spec).__name__}")
    if not isinstance(eval_spec, EvalSpec):
        raise ValueError(f"eval_spec must be an EvalSpec; got {type(eval_spec).__name__}")
    if evaluator not in ("inline", "sidecar"):
        raise ValueError(f"evaluator must be 'inline' or 'sidecar'; got {evaluator!r}")
    if sidecar.watching() is not None:
        return sidecar.watch(estimator, eval_spec)
    if train_spec.max_steps is None and eval_spec.early_stopping is None \
            and not estimator.callbacks:
        raise ValueError("TrainSpec(max_steps=None) trains until stopped: give EvalSpec("
                         "early_stopping=...) or an Estimator callback that requests a stop")
    if evaluator == "sidecar":
        return sidecar.train_for_sidecar(estimator, train_spec, eval_spec)
    return _inline(estimator, train_spec, eval_spec)


def _targets(every: int, max_steps: int | None) -> Iterator[int]:
    if max_steps is None:
        return itertools.count(every, every)
    return iter([*range(every, max_steps, every), max_steps])


def _inline(estimator: Estimator, train_spec: TrainSpec, eval_spec: EvalSpec) -> dict[str, Any]:
    best_rule, stopping = eval_spec.best, eval_spec.early_stopping
    model_dir, chief = estimator.model_dir, estimator.strategy.is_chief
    state = {"best_step": None, "best_value": None, "stop_value": None,
             "since_improvement": 0, "stopped_early": False, "last": None}
    state_path = model_dir / _STATE_FILE if model_dir is not None else None
    if state_path is not None and state_path.is_file():
        state.update(json.loads(state_path.read_text(encoding="utf-8")))
    if model_dir is not None:
        recover_directory(model_dir / "best")
    for exporter in eval_spec.exporters:
        exporter.load(model_dir)
    exported: list[dict[str, Any]] = []

    estimator._restore_if_needed()
    every = train_spec.eval_every or train_spec.max_steps
    evaluated = state["last"]["step"] if state["last"] else 0
    # A run stopped between a checkpoint and its evaluation evaluates that step first
    # (train() returns at once when the estimator is already there).
    targets = (t for t in _targets(every, train_spec.max_steps)
               if t > evaluated and t >= estimator.step)
    if state["stopped_early"]:
        targets = iter(())
    first = next(targets, None)
    if first is None:
        metrics = estimator.evaluate(eval_spec.data, batch_size=eval_spec.batch_size,
                                     steps=eval_spec.steps)
        exported += _export(estimator, eval_spec, metrics, final=True)
    for target in itertools.chain([first] if first is not None else [], targets):
        estimator.train(train_spec.data, max_steps=target, batch_size=train_spec.batch_size,
                        seed=train_spec.seed, checkpoint_every=train_spec.checkpoint_every)
        metrics = estimator.evaluate(eval_spec.data, batch_size=eval_spec.batch_size,
                                     steps=eval_spec.steps)
        state["last"] = {"step": estimator.step, **_json_metrics(metrics)}
        value = _metric(metrics, best_rule.metric, "best_metric")
        if best_rule.improves(value, state["best_value"]):
            state["best_value"], state["best_step"] = value, estimator.step
            if eval_spec.keep_best and model_dir is not None and chief:
                _keep_best(estimator, metrics)
            estimator.strategy.barrier()
        if stopping is not None:
            current = _metric(metrics, stopping.metric, "early_stopping.metric")
            if stopping.improves(current, state["stop_value"]):
                state["stop_value"], state["since_improvement"] = current, 0
            else:
                state["since_improvement"] += 1
            if state["since_improvement"] >= stopping.patience:
                state["stopped_early"] = True
                _log.info("early stopping at step %d: %s has not improved for %d evaluations",
                          estimator.step, stopping.metric, stopping.patience)
        final = target == train_spec.max_steps or state["stopped_early"] or estimator.stopped
        exported += _export(estimator, eval_spec, metrics, final=final)
        if state_path is not None and chief:
            atomic_write(state_path, json.dumps(state, indent=1, sort_keys=True) + "\n")
        if state["stopped_early"] or estimator.stopped:
            break
    return {**metrics, "best_step": state["best_step"],
            "stopped_early": bool(state["stopped_early"]), "exported": exported}


def _export(estimator: Estimator, eval_spec: EvalSpec, metrics: dict[str, Any], *,
            final: bool) -> list[dict[str, Any]]:
    records = [exporter.maybe_export(estimator, metrics, final=final)
               for exporter in eval_spec.exporters]
    return [r for r in records if r is not None]


def _json_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in metrics.items()}


def _metric(metrics: dict[str, Any], name: str, field: str) -> float:
    value = metrics.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        scalars = sorted(k for k, v in metrics.items()
                         if isinstance(v, float) and k != "step")
        raise ValueError(f"{field}={name!r} is not an evaluation metric; the evaluation "
                         f"reports {scalars}. Add it to Estimator(metrics=...) or pick one "
                         "of those")
    return float(value)


def _keep_best(estimator: Estimator, metrics: dict[str, Any]) -> None:
    """Copy the checkpoint of the current step to ``model_dir/best`` (atomically)."""
    source = estimator.latest_checkpoint()
    if source is None or estimator.model_dir is None:
        return
    target = estimator.model_dir / "best"
    with staging_directory(estimator.model_dir, "best") as tmp:
        tmp.mkdir()
        for item in source.iterdir():
            try:  # checkpoint files are never modified in place, so a hard link is a copy
                os.link(item, tmp / item.name)
            except OSError:
                shutil.copy2(item, tmp / item.name)
        best = {"step": estimator.step, "checkpoint": source.name, **_json_metrics(metrics)}
        (tmp / "metrics.json").write_text(json.dumps(best, indent=1, sort_keys=True) + "\n",
                                          encoding="utf-8")
        replace_directory(tmp, target)  # fsyncs the staged tree before the rename
    _log.info("best checkpoint (step %d) kept in %s", estimator.step, target)
