"""The Estimator: train, evaluate, predict with and export one model, resuming exactly.

An :class:`Estimator` owns the parts of training that are easy to get subtly wrong: the order
examples are seen in (:mod:`~graft.train.sampling`), checkpoints a crash cannot corrupt
(:mod:`~graft.train.checkpoint`), resuming so exactly that a resumed run ends with the weights
of one that never stopped (:mod:`~graft.train.resume`, :mod:`~graft.train.rng`), Ctrl-C that
never cuts an update in half (:mod:`~graft.train.interrupt`), exact evaluation over any number
of workers (:mod:`~graft.train.evaluation`) and the one-process-writes rule. The model, loss
and optimizer stay the user's own PyTorch objects. ``train_and_evaluate``, exporters and the
sidecar evaluator build on it (:mod:`~graft.train.train_and_evaluate`).

Layout of ``model_dir``::

    checkpoints/step-000000100/   model.safetensors, state.safetensors, state.json
    checkpoints/latest            name of the newest checkpoint
    events.out.tfevents.*         TensorBoard scalars (train/loss, train/lr, eval/<metric>)
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from graft.distribute.strategy import Strategy, default_strategy
from graft.errors import DataError, TrainingError
from graft.losses import SparseSoftmaxCrossEntropy
from graft.train import batches as _batches
from graft.train.checkpoint import CheckpointManager, read_checkpoint
from graft.train.checks import check_int
from graft.train.custom_metrics import split_metrics
from graft.train.events import Events
from graft.train.hooks import Callback
from graft.train.inference import Inference
from graft.train.resume import WarmStart, checkpoint_state, position_of, warm_start, worker_rng
from graft.train.sampling import Position
from graft.train.training import TrainLoop

__all__ = ["Estimator"]

_log = logging.getLogger("graft.train")


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def _by_keyword(loss: Any) -> bool:
    """Whether ``loss`` takes ``labels=`` and ``logits=`` (graft.losses do; torch's don't)."""
    try:
        params = inspect.signature(loss).parameters
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return all(n in params and params[n].kind in kinds for n in ("labels", "logits"))


class Estimator(TrainLoop, Inference):
    """Trains, evaluates, predicts with and exports one model, with exact resumption.

    ``train`` is in :mod:`graft.train.training`, ``predict`` and ``export`` in
    :mod:`graft.train.inference`; the rest is here.

    Args:
        model: Called as ``model(x)`` / ``model(*xs)`` / ``model(**xs)`` on a batch's inputs
            (tensor / tuple / dict), returning logits; moved to the strategy's device. Hub
            modules inside it become the parents of its exports.
        loss: Returns a 0-d batch mean. A loss taking ``labels=`` and ``logits=`` (every
            :mod:`graft.losses` loss) is called with those keywords, any other as
            ``loss(logits, labels)``. Default: ``graft.losses.SparseSoftmaxCrossEntropy()``.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer``; default ``Adam(lr=1e-3)``.
        scheduler: ``scheduler(optimizer) -> LRScheduler``, stepped after every step.
        metrics: Evaluation metrics besides the loss: built-in names (``"accuracy"``,
            ``"top<k>"``, ``"confusion_matrix"``), functions ``fn(logits, labels)`` and metric
            objects such as ``torchmetrics.Metric`` (see :mod:`graft.train.custom_metrics`),
            as a list or a dict name -> metric.
        model_dir: Checkpoints and event files; training there again resumes. None: nothing
            is written.
        strategy: Devices and workers; default :func:`graft.distribute.default_strategy`.
        compile: ``True`` (or a backend name) trains through ``torch.compile(model)``.
        checkpoint_every: Save every this many steps (and at the end, and on Ctrl-C).
        checkpoint_every_seconds: Also save when this many seconds of ``clock`` have passed
            since the last save (TF's ``save_checkpoints_secs``); None: by steps only.
        keep_checkpoints: How many of the newest checkpoints to keep.
        log_every: Record loss, learning rate and speed every this many steps.
        num_workers: DataLoader processes for map-style data (streams are read in-process).
        collate_fn: A list of ``(inputs, label)`` items -> ``(inputs, labels)``; None:
            torch's default. ``graft.data.module_collate(module)`` prepares images and text.
        callbacks: :class:`graft.train.hooks.Callback` objects (on step, evaluation,
            checkpoint).
        warm_start_from: Initial weights for a fresh start (no checkpoint in ``model_dir``):
            a checkpoint or model_dir path, or a :class:`graft.train.resume.WarmStart`.
        clock: Seconds for ``checkpoint_every_seconds`` (default ``time.monotonic``).
        progress: Show tqdm progress bars (on the chief only).
        tensorboard: Write TensorBoard event files to ``model_dir``.

    Raises:
        ValueError: an argument is out of range.
        ExtraNotInstalled: ``tensorboard`` is on with a ``model_dir`` and the package is
            missing (``pip install 'graft-hub[train]'``).
    """

    def __init__(self, model: nn.Module, *, loss: Callable[..., torch.Tensor] | None = None,
                 optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
                 scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
                 metrics: Any = ("accuracy",),
                 model_dir: str | os.PathLike[str] | None = None,
                 strategy: Strategy | None = None, compile: bool | str = False,
                 checkpoint_every: int = 100, checkpoint_every_seconds: float | None = None,
                 keep_checkpoints: int = 3, log_every: int = 10, num_workers: int = 0,
                 collate_fn: Callable[[list[Any]], Any] | None = None,
                 callbacks: Sequence[Callback] = (),
                 warm_start_from: str | os.PathLike[str] | WarmStart | None = None,
                 clock: Callable[[], float] = time.monotonic, progress: bool = True,
                 tensorboard: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        for name, value, what in (("loss", loss, "a callable returning a 0-d tensor"),
                                  ("optimizer", optimizer, "a factory params -> Optimizer, "
                                   "e.g. lambda p: torch.optim.SGD(p, lr=0.1)"),
                                  ("scheduler", scheduler, "a factory optimizer -> LRScheduler"),
                                  ("collate_fn", collate_fn, "a callable items -> batch"),
                                  ("clock", clock, "a callable returning seconds")):
            if value is not None and not callable(value):
                raise ValueError(f"{name} must be {what}; got {type(value).__name__}")
        if strategy is not None and not isinstance(strategy, Strategy):
            raise ValueError(f"strategy must be a graft.distribute Strategy such as "
                             f"OneDevice('cpu'); got {type(strategy).__name__}")
        if not isinstance(compile, (bool, str)):
            raise ValueError(f"compile must be True, False or a torch.compile backend name; "
                             f"got {compile!r}")
        bad = [c for c in callbacks if not isinstance(c, Callback)]
        if isinstance(callbacks, Callback) or bad:
            raise ValueError("callbacks must be a list of graft.train.hooks.Callback objects; "
                             f"got {callbacks!r}")
        if checkpoint_every_seconds is not None and (
                isinstance(checkpoint_every_seconds, bool)
                or not isinstance(checkpoint_every_seconds, (int, float))
                or not checkpoint_every_seconds > 0):
            raise ValueError(f"checkpoint_every_seconds must be a number > 0 or None; got "
                             f"{checkpoint_every_seconds!r}")
        self.checkpoint_every = check_int("checkpoint_every", checkpoint_every, 1,
                                           "Use a step count such as 100.")
        check_int("keep_checkpoints", keep_checkpoints, 1, "Keep at least one.")
        self.log_every = check_int("log_every", log_every, 1, "Use a step count such as 10.")
        self.num_workers = check_int("num_workers", num_workers, 0,
                                      "Use 0 to read data in this process.")
        self.metrics, self.custom_metrics = split_metrics(metrics)
        self.model_dir = Path(model_dir).expanduser() if model_dir is not None else None
        self.progress = bool(progress)
        if tensorboard and self.model_dir is not None:
            from graft._extras import require

            require("tensorboard", "train", "Writing TensorBoard event files "
                    "(Estimator(tensorboard=True), or pass tensorboard=False)")
        self.collate_fn, self.callbacks, self.clock = collate_fn, list(callbacks), clock
        self.checkpoint_every_seconds = checkpoint_every_seconds
        if warm_start_from is not None and not isinstance(warm_start_from, WarmStart):
            warm_start_from = WarmStart(warm_start_from)
        self.warm_start_from = warm_start_from

        self.model = model
        self.loss = loss if loss is not None else SparseSoftmaxCrossEntropy()
        self._loss_by_keyword = _by_keyword(self.loss)
        self._owns_strategy = strategy is None
        self.strategy = strategy or default_strategy()
        self.strategy.setup()
        wrapped = self.strategy.wrap_model(model)
        if compile:
            wrapped = torch.compile(wrapped, backend=compile if isinstance(compile, str)
                                    else "inductor")
        self._train_model = wrapped
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"model {type(model).__name__} has no trainable parameters; load "
                             "hub modules with trainable=True or add a trainable head")
        self.optimizer = (optimizer or _adam)(params)
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer factory returned a {type(self.optimizer).__name__}, "
                             "not a torch.optim.Optimizer")
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        self._manager = (CheckpointManager(self.model_dir / "checkpoints", keep=keep_checkpoints)
                         if self.model_dir is not None else None)
        self._events = Events(self.model_dir, bool(tensorboard) and self.strategy.is_chief)
        self._pos = Position()
        self._restored = False
        self._pending_rng: Any = None
        self._last_saved: int | None = None
        self._last_saved_at = clock()
        self._stop = False
        self.stopped = False  # whether the last train() ended on request_stop()
        self._example_inputs: tuple[torch.Tensor, ...] | None = None
        self.history: list[dict[str, float]] = []
        self.warm_started: list[str] = []

    # -- state --------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Optimizer steps taken so far (including those of a restored checkpoint)."""
        return self._pos.step

    @property
    def device(self) -> torch.device:
        return self.strategy.device

    def request_stop(self) -> None:
        """End ``train`` after the current step (from a callback); it checkpoints first."""
        self._stop = True

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint in ``model_dir``, or None."""
        return self._manager.latest() if self._manager is not None else None

    def restore(self, checkpoint: str | os.PathLike[str] = "latest") -> int:
        """Load model, optimizer, position and RNG states from a checkpoint.

        Args:
            checkpoint: ``"latest"``, ``"best"`` (``model_dir/best``) or a checkpoint path.

        Returns:
            The restored step.

        Raises:
            FileNotFoundError: there is no such checkpoint.
            TrainingError: the checkpoint does not fit this model or optimizer.
        """
        if checkpoint == "latest":
            path = self.latest_checkpoint()
            if path is None:
                raise FileNotFoundError(f"no checkpoint to restore: model_dir="
                                        f"{self.model_dir} has none")
        elif checkpoint == "best":
            if self.model_dir is None:
                raise FileNotFoundError("no best checkpoint: this Estimator has no model_dir")
            path = self.model_dir / "best"
        else:
            path = Path(checkpoint)
        self._load(path)
        self._restored = True
        return self._pos.step

    def _restore_if_needed(self) -> None:
        if self._restored:
            return
        self._restored = True
        path = self.latest_checkpoint()
        if path is not None:
            self._load(path)
            _log.info("resumed from %s at step %d", path, self._pos.step)
        elif self.warm_start_from is not None:
            self.warm_started = warm_start(self.model, self.warm_start_from)
            _log.info("warm-started %d tensors from %s", len(self.warm_started),
                      self.warm_start_from.source)

    def _load(self, path: Path) -> None:
        ckpt = read_checkpoint(path)
        try:
            self.model.load_state_dict(ckpt.model)
            if ckpt.optimizer is not None:
                self.optimizer.load_state_dict(ckpt.optimizer)
            if ckpt.scheduler is not None and self.scheduler is not None:
                self.scheduler.load_state_dict(ckpt.scheduler)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise TrainingError(f"checkpoint {ckpt.path} does not fit this model/optimizer: "
                                f"{exc}. Build the Estimator with the model and optimizer it "
                                "was trained with, or use a new model_dir") from exc
        self._pos = position_of(ckpt)
        self._pending_rng = worker_rng(ckpt, self.strategy.rank)
        self._last_saved = ckpt.step
        self._events.purge_step = ckpt.step + 1

    def _save(self) -> None:
        """Checkpoint the current step (chief writes, everyone waits), then the hooks."""
        if self._manager is None or self._pos.step in (0, self._last_saved):
            return
        data, rng = checkpoint_state(self._pos, self.strategy)
        path = self._manager.directory / self._manager.name(self._pos.step)
        if self.strategy.is_chief:
            path = self._manager.save(
                self._pos.step, model=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
                rng=rng, data=data)
            _log.info("checkpoint %d saved to %s", self._pos.step, path)
            self._events.flush()  # the scalars up to this checkpoint are on disk with it
        self.strategy.barrier()
        self._last_saved, self._last_saved_at = self._pos.step, self.clock()
        for callback in self.callbacks:
            callback.on_checkpoint(self, path)

    # -- helpers ------------------------------------------------------------------------------

    def _progress(self, **kwargs: Any) -> Any:
        from tqdm.auto import tqdm

        return tqdm(disable=not (self.progress and self.strategy.is_chief),
                    dynamic_ncols=True, **kwargs)

    def _to_device(self, inputs: Any, labels: Any) -> tuple[Any, Any]:
        moved, labels, values = _batches.move(inputs, labels, self.device)
        if self._example_inputs is None:
            self._example_inputs = tuple(x[:2].detach().cpu().clone() for x in values
                                         if isinstance(x, torch.Tensor))
        return moved, labels

    def _compute_loss(self, logits: torch.Tensor, labels: Any, where: str | int) -> torch.Tensor:
        """The loss of one batch; ``where`` names it in errors (a step number, or a phase)."""
        try:
            loss = (self.loss(labels=labels, logits=logits) if self._loss_by_keyword
                    else self.loss(logits, labels))
        except DataError as exc:
            where = f"step {where}" if isinstance(where, int) else where
            raise DataError(f"{where}: {exc}") from exc
        if not isinstance(loss, torch.Tensor) or loss.dim():
            where = f"step {where}" if isinstance(where, int) else where
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TrainingError(f"{where}: the loss must return a 0-d tensor (the batch "
                                f"mean); got {shape}. Use reduction='mean'")
        return loss

    def close(self) -> None:
        """Close the event writer; tear down the strategy if the Estimator made it."""
        self._events.close()
        if self._owns_strategy:
            self.strategy.teardown()

    def __enter__(self) -> Estimator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- train, evaluate, predict, export -----------------------------------------------------

    def evaluate(self, data: Any, *, batch_size: int = 32,
                 steps: int | None = None) -> dict[str, Any]:
        """Evaluate the model on every example of ``data`` exactly once.

        Args:
            data: Map-style ``(inputs, label)`` data, a stream of pairs, or an input_fn.
            batch_size: Examples per batch across all workers (the last may be short).
            steps: Evaluate only the first ``steps`` batches (``steps * batch_size``
                examples in the data's order); None: all of it.

        Returns:
            ``{"loss": mean over examples, "examples": n, "step": training step, ...}`` with
            every metric of ``metrics``.

        Raises:
            DataError: the data is empty, malformed, or its labels do not fit the model.
        """
        from graft.train.evaluation import evaluate

        check_int("batch_size", batch_size, 1, "Use e.g. batch_size=64.")
        if steps is not None:
            check_int("steps", steps, 1, "Use None to evaluate every example.")
        return evaluate(self, data, batch_size=batch_size, steps=steps)
