"""The sidecar evaluator: a process of its own that evaluates each checkpoint of a running job.

TensorFlow's ``train_and_evaluate`` has an "evaluator" task; this is Graft's. The training job
calls ``train_and_evaluate(..., evaluator="sidecar")``: it trains, checkpoints every
``eval_every`` steps, keeps every checkpoint until the sidecar has evaluated it (however slow
the sidecar is, none is pruned first), and writes ``model_dir/final.json`` when it ends. The
sidecar runs the same script::

    graft evaluate --watch MODEL_DIR train.py [ARGS...]

which sets ``GRAFT_EVALUATE_WATCH=MODEL_DIR`` and runs ``train.py``; there, the
``train_and_evaluate`` call watches ``MODEL_DIR/checkpoints`` instead of training. It evaluates
every checkpoint exactly once, oldest first, records each result atomically in
``MODEL_DIR/eval/step-<N>.json`` (so a restarted sidecar skips what is done), runs the
exporters, and returns once the checkpoint the final marker names is evaluated.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import runpy
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graft._fs import atomic_write
from graft.errors import TrainingError

if TYPE_CHECKING:
    from graft.train.estimator import Estimator
    from graft.train.specs import EvalSpec, TrainSpec

__all__ = ["cli", "evaluated_steps", "train_for_sidecar", "watch", "watching"]

_log = logging.getLogger("graft.train")
_FINAL = "final.json"
_watched = False


def watching() -> tuple[Path, float] | None:
    """``(model_dir, poll seconds)`` in a process ``graft evaluate --watch`` started."""
    from graft.settings import evaluator_watch

    return evaluator_watch()


def _record(model_dir: Path, step: int) -> Path:
    return model_dir / "eval" / f"step-{step:09d}.json"


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step-"))


def evaluated_steps(model_dir: str | os.PathLike[str]) -> list[int]:
    """The steps whose checkpoints a sidecar has evaluated, in order."""
    folder = Path(model_dir) / "eval"
    return sorted(int(p.stem.removeprefix("step-")) for p in folder.glob("step-*.json"))


def _read_json(path: Path) -> Any:
    from graft.format.jsonio import loads

    return loads(path.read_bytes(), what=str(path), max_bytes=1 << 22) if path.is_file() \
        else None


# -- the training job's side ------------------------------------------------------------------


def train_for_sidecar(estimator: Estimator, train_spec: TrainSpec,
                      eval_spec: EvalSpec) -> dict[str, Any]:
    """Train for a sidecar evaluator (see the module docstring)."""
    model_dir = estimator.model_dir
    if model_dir is None or estimator._manager is None:
        raise ValueError("evaluator='sidecar' needs an Estimator with a model_dir: the "
                         "sidecar reads the checkpoints from there")
    if eval_spec.early_stopping is not None:
        raise ValueError("early stopping decides in the training job from evaluations, "
                         "which a sidecar runs elsewhere; use evaluator='inline' with "
                         "early_stopping, or drop it")
    estimator._manager.protect = lambda path: not _record(model_dir, _step_of(path)).is_file()
    marker = model_dir / _FINAL
    if estimator.strategy.is_chief and marker.exists():
        marker.unlink()  # a re-run with more steps: the sidecar must not stop at the old end
    every = train_spec.eval_every or train_spec.checkpoint_every
    estimator.train(train_spec.data, max_steps=train_spec.max_steps,
                    batch_size=train_spec.batch_size, seed=train_spec.seed,
                    checkpoint_every=every)
    if estimator.strategy.is_chief:
        atomic_write(marker, json.dumps({"step": estimator.step}) + "\n")
    estimator.strategy.barrier()
    return {"step": estimator.step, "evaluator": "sidecar", "final": str(marker)}


# -- the sidecar's side -----------------------------------------------------------------------


def watch(estimator: Estimator, eval_spec: EvalSpec) -> dict[str, Any]:
    """Evaluate every checkpoint of the watched ``model_dir`` once; return at the final one.

    Returns:
        The last evaluation's metrics with ``"evaluated"`` (the steps this call evaluated)
        and ``"exported"`` (the records of the exports it made).

    Raises:
        ValueError: the Estimator's ``model_dir`` is not the watched one.
    """
    from graft.train.checkpoint import CheckpointManager
    from graft.train.events import Events
    from graft.train.train_and_evaluate import _export, _json_metrics

    global _watched
    _watched = True
    found = watching()
    assert found is not None  # train_and_evaluate only calls this while watching
    model_dir, poll = found
    if estimator.model_dir is None or estimator.model_dir.resolve() != model_dir.resolve():
        raise ValueError(f"graft evaluate --watch {model_dir}: the script's Estimator has "
                         f"model_dir={estimator.model_dir}; watch the directory it trains in")
    if estimator.strategy.world_size > 1:
        raise ValueError("the sidecar evaluator is one process; start it without graft launch")
    estimator._events = Events(model_dir / "eval", estimator._events.enabled)
    for exporter in eval_spec.exporters:
        exporter.load(model_dir)
    checkpoints = CheckpointManager(model_dir / "checkpoints")
    evaluated: list[int] = []
    exported: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    while True:
        final = _read_json(model_dir / _FINAL)  # read first: what it names is already saved
        final_step = final.get("step") if isinstance(final, dict) else None
        for path in checkpoints.checkpoints():
            step = _step_of(path)
            if _record(model_dir, step).is_file():
                continue
            estimator.restore(path)
            metrics = estimator.evaluate(eval_spec.data, batch_size=eval_spec.batch_size,
                                         steps=eval_spec.steps)
            done = step == final_step
            exported += _export(estimator, eval_spec, metrics, final=done)
            _write_record(model_dir, step, path.name, _json_metrics(metrics), done)
            evaluated.append(step)
            _log.info("sidecar: evaluated checkpoint %d", step)
        if final_step is not None:
            record = _read_json(_record(model_dir, final_step))
            if record is None:
                raise TrainingError(f"the job ended at step {final_step}, but "
                                    f"{model_dir / 'checkpoints'} has no checkpoint of it to "
                                    "evaluate")
            if not record.get("final"):
                # The last checkpoint was evaluated before the job wrote its marker: the
                # final exports are still to do, from that checkpoint.
                estimator.restore(checkpoints.directory / checkpoints.name(final_step))
                metrics = {**record["metrics"], "step": final_step}
                exported += _export(estimator, eval_spec, metrics, final=True)
                _write_record(model_dir, final_step, record["checkpoint"], record["metrics"],
                              True)
            metrics = metrics or {**record["metrics"], "step": final_step}
            break
        time.sleep(poll)  # waiting for the job's next checkpoint, not timing a kill
    return {**metrics, "evaluated": evaluated, "exported": exported}


def _write_record(model_dir: Path, step: int, checkpoint: str, metrics: dict[str, Any],
                  final: bool) -> None:
    path = _record(model_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"step": step, "checkpoint": checkpoint, "final": final,
                                   "metrics": metrics}, indent=1, sort_keys=True) + "\n")


# -- graft evaluate --watch -------------------------------------------------------------------


def cli(args: argparse.Namespace) -> None:
    """``graft evaluate --watch MODEL_DIR SCRIPT [ARGS...]``."""
    global _watched
    script = Path(args.script)
    if not script.is_file():
        raise FileNotFoundError(f"training script {script} does not exist; give the script "
                                "the job runs, e.g. graft evaluate --watch runs/a train.py")
    if args.poll is not None and not args.poll > 0:
        raise ValueError(f"--poll must be a number of seconds > 0; got {args.poll}")
    os.environ["GRAFT_EVALUATE_WATCH"] = str(Path(args.watch).expanduser().resolve())
    if args.poll is not None:
        os.environ["GRAFT_EVALUATE_POLL"] = str(args.poll)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # one process, never a job's worker
        os.environ.pop(key, None)
    _watched = False
    sys.argv = [str(script), *args.script_args]
    sys.path.insert(0, str(script.resolve().parent))
    runpy.run_path(str(script), run_name="__main__")
    if not _watched:
        raise TrainingError(f"{script} ended without calling graft.train_and_evaluate, so "
                            "there was nothing to evaluate; the sidecar runs the job's own "
                            "script")
