"""The Estimator: train, evaluate, predict and export one model, and ``train_and_evaluate``.

An :class:`Estimator` owns the parts of training that are easy to get subtly wrong: the order
examples are seen in, checkpoints that a crash cannot corrupt, resuming so exactly that a
resumed run ends with the same weights as one that never stopped, exact evaluation counts,
and the one-process-writes rule of distributed training. The model, loss and optimizer stay
the user's own PyTorch objects.

Data is a map-style dataset (``len(data)`` and ``data[i] -> (inputs, label)``) or a callable
``input_fn`` returning one. The Estimator samples it itself: epoch ``e``'s order is a
permutation drawn from a generator seeded with ``(seed, e)``, the strategy shards it between
workers, and each step takes the next ``batch_size`` examples (the last partial batch of an
epoch is dropped, so every step has a full batch). The position ``(epoch, batch)`` is part of
every checkpoint. Batches are collated by torch's default collation or the Estimator's
``collate_fn`` (``graft.train.data.module_collate(module)`` turns raw images or text into a
hub module's inputs); batched inputs are passed as ``model(x)`` for a tensor, ``model(*xs)``
for a tuple, ``model(**xs)`` for a dict.

Layout of ``model_dir``::

    checkpoints/step-000000100/   model.safetensors, state.safetensors, state.json
    checkpoints/latest            name of the newest checkpoint
    best/                         the best evaluated checkpoint + metrics.json (train_and_evaluate)
    train_and_evaluate.json       evaluation bookkeeping, so a re-run resumes early stopping
    events.out.tfevents.*         TensorBoard scalars: train/loss, train/lr,
                                  train/steps_per_sec, eval/<metric>
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Sampler

from graft.distribute.strategy import Strategy, default_strategy
from graft.errors import DataError, TrainingError
from graft.train.checkpoint import (
    Checkpoint,
    CheckpointManager,
    capture_rng,
    read_checkpoint,
    recover_directory,
    replace_directory,
    restore_rng,
    staging_directory,
    write_text_atomic,
)
from graft.train.losses import sparse_softmax_cross_entropy
from graft.train.metrics import ClassificationMetrics, check_metrics
from graft.train.specs import EvalSpec, TrainSpec

__all__ = ["Estimator", "train_and_evaluate"]

_log = logging.getLogger("graft.train")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[Any], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]

_STATE_FILE = "train_and_evaluate.json"


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


# -- checks ----------------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {expected}; got {type(value).__name__} "
                         f"{value!r}. {fix}")
    return value


def _resolve_data(data: Any, role: str) -> Any:
    """The dataset behind ``data`` (calling an input_fn), checked to be non-empty pairs."""
    if callable(data) and not hasattr(data, "__getitem__"):
        data = data()
    if isinstance(data, torch.Tensor) or not (hasattr(data, "__len__")
                                              and hasattr(data, "__getitem__")):
        raise DataError(f"{role} data must be a map-style dataset (len() and [i] -> (inputs, "
                        f"label)) or a callable returning one; got {type(data).__name__}. "
                        "Wrap tensors as torch.utils.data.TensorDataset(x, y)")
    size = len(data)
    if size == 0:
        raise DataError(f"{role} data is empty (len 0); give at least one (inputs, label) "
                        "example")
    first = data[0]
    if not isinstance(first, (tuple, list)) or len(first) != 2:
        kind = type(first).__name__ + (f" of length {len(first)}"
                                       if isinstance(first, (tuple, list)) else "")
        raise DataError(f"{role} data item 0 is a {kind}; every item must be an (inputs, "
                        "label) pair (TensorDataset(x, y) gives such pairs)")
    return data


def _as_inputs(inputs: Any) -> tuple[Any, ...]:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _call(model: Any, inputs: Any) -> Any:
    """``model(x)``, ``model(*xs)`` or ``model(**xs)`` for a tensor, tuple or dict batch."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*_as_inputs(inputs))


def _seed_for(*parts: int) -> int:
    """A well-mixed 64-bit seed for a tuple of ints (``(seed, epoch)`` -> generator seed)."""
    high, low = np.random.SeedSequence(list(parts)).generate_state(2, np.uint32)
    return (int(high) << 32) | int(low)


def _permutation(size: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(_seed_for(seed, epoch))
    return torch.randperm(size, generator=generator).tolist()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- sampling --------------------------------------------------------------------------------


@dataclass
class _Position:
    """How far training has gone: steps taken, and where in which epoch the next batch is."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    # What the position is relative to; a change makes (epoch, batch) approximate.
    examples: int | None = None
    batch_size: int | None = None
    seed: int | None = None
    world_size: int | None = None


class _TrainBatches(Sampler[list[int]]):
    """This worker's index batches from a position on, epoch after epoch.

    Epoch ``e``'s order is the permutation seeded by ``(seed, e)``, sharded by the strategy;
    batch ``b`` of an epoch is its ``b``-th slice of ``per_worker`` indices. Only
    ``steps_per_epoch`` full batches are taken per epoch.
    """

    def __init__(self, *, size: int, seed: int, shard: Callable[[list[int]], list[int]],
                 per_worker: int, steps_per_epoch: int, epoch: int, batch: int,
                 steps: int) -> None:
        self.size, self.seed, self.shard = size, seed, shard
        self.per_worker, self.steps_per_epoch = per_worker, steps_per_epoch
        self.epoch, self.batch, self.steps = epoch, batch, steps

    def __iter__(self) -> Iterator[list[int]]:
        epoch, batch, left = self.epoch, self.batch, self.steps
        while left > 0:
            order = self.shard(_permutation(self.size, self.seed, epoch))
            while batch < self.steps_per_epoch and left > 0:
                yield order[batch * self.per_worker:(batch + 1) * self.per_worker]
                batch += 1
                left -= 1
            epoch, batch = epoch + 1, 0

    def __len__(self) -> int:
        return self.steps


class _InterruptGuard:
    """Holds Ctrl-C back while an optimizer update or a checkpoint write is under way.

    Outside those critical sections Ctrl-C raises ``KeyboardInterrupt`` at once as usual; the
    model, optimizer and position then still describe the last completed step, which is what
    the interrupt checkpoint saves. Only the main thread can install signal handlers; in
    other threads the guard does nothing.
    """

    def __init__(self) -> None:
        self._depth = 0
        self._pending = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self._depth:
            self._pending = True
            return
        self._forward(signum, frame)

    def _forward(self, signum: int, frame: Any) -> None:
        if callable(self._previous) and self._previous is not signal.default_int_handler:
            self._previous(signum, frame)
        elif self._previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._pending and not self._depth:
            self._pending = False
            self._forward(signal.SIGINT, None)


# -- the Estimator ---------------------------------------------------------------------------


class Estimator:
    """Trains, evaluates, predicts with and exports one model, with exact resumption.

    Args:
        model: The model; called as ``model(x)`` / ``model(*xs)`` / ``model(**xs)`` on a
            batch's inputs (tensor / tuple / dict) and returning logits. It is moved to
            the strategy's device. A hub module inside it becomes a parent of the export.
        loss: ``loss(logits, labels) -> 0-d tensor``, a mean over the batch. Default:
            :func:`graft.train.losses.sparse_softmax_cross_entropy` (int64 class labels).
        optimizer: ``optimizer(params) -> torch.optim.Optimizer`` over the trainable
            parameters. Default: ``Adam(lr=1e-3)``.
        scheduler: ``scheduler(optimizer) -> LRScheduler``, stepped after every optimizer
            step, or None. Its ``state_dict`` must hold only tensors and JSON values.
        metrics: Evaluation metrics besides the loss: ``"accuracy"``, ``"top<k>"``,
            ``"confusion_matrix"`` (see :mod:`graft.train.metrics`); ``()`` for none.
        model_dir: Where checkpoints and TensorBoard events go; training there again resumes
            from its latest checkpoint. ``None``: nothing is written.
        strategy: Devices and workers; default :func:`graft.distribute.default_strategy`
            (``DataParallel`` in a process ``graft launch`` started, else one process on
            the GPU if there is one).
        compile: ``True`` trains through ``torch.compile(model)``; a string picks the
            compile backend (``"inductor"``, ``"aot_eager"``). Evaluation runs eagerly.
        checkpoint_every: Save a checkpoint every this many steps (and at the end of each
            ``train`` call, and on Ctrl-C).
        keep_checkpoints: How many of the newest checkpoints to keep.
        log_every: Record the loss, learning rate and speed every this many steps.
        num_workers: DataLoader worker processes for reading data (0: in this process).
        collate_fn: Turns a list of ``(inputs, label)`` items into one ``(inputs, labels)``
            batch; None: torch's default collation (stacks tensors, numbers and arrays).
            ``graft.train.data.module_collate(module)`` prepares raw images and text.
        progress: Show tqdm progress bars (on the chief worker only).
        tensorboard: Write TensorBoard event files to ``model_dir``.

    Raises:
        ValueError: an argument is out of range.
        ExtraNotInstalled: ``tensorboard`` is on, a ``model_dir`` is given, and the
            ``tensorboard`` package is missing (``pip install 'graft-hub[train]'``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss: LossFn | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        metrics: Sequence[str] = ("accuracy",),
        model_dir: str | os.PathLike[str] | None = None,
        strategy: Strategy | None = None,
        compile: bool | str = False,
        checkpoint_every: int = 100,
        keep_checkpoints: int = 3,
        log_every: int = 10,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        progress: bool = True,
        tensorboard: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if loss is not None and not callable(loss):
            raise ValueError(f"loss must be a callable (logits, labels) -> 0-d tensor; got "
                             f"{type(loss).__name__}")
        if optimizer is not None and not callable(optimizer):
            raise ValueError(f"optimizer must be a factory params -> torch.optim.Optimizer, "
                             f"e.g. lambda p: torch.optim.SGD(p, lr=0.1); got "
                             f"{type(optimizer).__name__}")
        if scheduler is not None and not callable(scheduler):
            raise ValueError(f"scheduler must be a factory optimizer -> LRScheduler; got "
                             f"{type(scheduler).__name__}")
        if strategy is not None and not isinstance(strategy, Strategy):
            raise ValueError(f"strategy must be a graft.distribute Strategy such as "
                             f"OneDevice('cpu'); got {type(strategy).__name__}")
        if not isinstance(compile, (bool, str)):
            raise ValueError(f"compile must be True, False or a torch.compile backend name; "
                             f"got {compile!r}")
        self.checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 1,
                                           "Use a step count such as 100.")
        _check_int("keep_checkpoints", keep_checkpoints, 1, "Keep at least one.")
        self.log_every = _check_int("log_every", log_every, 1, "Use a step count such as 10.")
        self.num_workers = _check_int("num_workers", num_workers, 0,
                                      "Use 0 to read data in this process.")
        if collate_fn is not None and not callable(collate_fn):
            raise ValueError(f"collate_fn must be a callable list of items -> (inputs, labels); "
                             f"got {type(collate_fn).__name__}")
        self.collate_fn = collate_fn
        self.metrics = check_metrics(metrics)
        self.model_dir = Path(model_dir).expanduser() if model_dir is not None else None
        self.progress = bool(progress)
        self.tensorboard = bool(tensorboard) and self.model_dir is not None
        if self.tensorboard:
            from graft._extras import require

            require("tensorboard", "train", "Writing TensorBoard event files "
                    "(Estimator(tensorboard=True), or pass tensorboard=False)")

        self.model = model
        self.loss: LossFn = loss or sparse_softmax_cross_entropy
        self._owns_strategy = strategy is None
        self.strategy = strategy or default_strategy()
        self.strategy.setup()
        wrapped = self.strategy.wrap_model(model)
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            wrapped = torch.compile(wrapped, backend=backend)
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
        self._pos = _Position()
        self._restored = False
        self._pending_rng: dict[str, Any] | None = None
        self._last_saved: int | None = None
        self._purge_step: int | None = None
        self._writer: Any = None
        self._example_inputs: tuple[torch.Tensor, ...] | None = None
        self.history: list[dict[str, float]] = []

    # -- state --------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Optimizer steps taken so far (including those of a restored checkpoint)."""
        return self._pos.step

    @property
    def device(self) -> torch.device:
        return self.strategy.device

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
        self._load(read_checkpoint(path))
        self._restored = True
        return self._pos.step

    def _restore_if_needed(self) -> None:
        if self._restored:
            return
        self._restored = True
        path = self.latest_checkpoint()
        if path is not None:
            self._load(read_checkpoint(path))
            _log.info("resumed from %s at step %d", path, self._pos.step)

    def _load(self, ckpt: Checkpoint) -> None:
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
        fields = {k: ckpt.data.get(k) for k in ("epoch", "batch", "examples", "batch_size",
                                                 "seed", "world_size")}
        self._pos = _Position(step=ckpt.step, epoch=int(fields["epoch"] or 0),
                              batch=int(fields["batch"] or 0),
                              **{k: fields[k] for k in ("examples", "batch_size", "seed",
                                                        "world_size")})
        rng = ckpt.rng
        workers = rng.get("workers") if isinstance(rng, dict) else None
        if workers and self.strategy.rank < len(workers):
            rng = workers[self.strategy.rank]  # this worker's own random stream
        self._pending_rng = rng
        self._last_saved = ckpt.step
        self._purge_step = ckpt.step + 1

    def _save(self) -> None:
        """Checkpoint the current step (chief writes, everyone waits)."""
        if self._manager is None or self._pos.step in (0, self._last_saved):
            return
        rng = capture_rng(self.device)
        if self.strategy.world_size > 1:  # every worker's, so each resumes its own stream
            rng = {**rng, "workers": self.strategy.gather_states(rng)}
        if self.strategy.is_chief:
            data = {k: v for k, v in asdict(self._pos).items() if k != "step"}
            path = self._manager.save(
                self._pos.step,
                model=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
                rng=rng,
                data=data,
            )
            _log.info("checkpoint %d saved to %s", self._pos.step, path)
        self.strategy.barrier()
        self._last_saved = self._pos.step

    # -- helpers -------------------------------------------------------------------------------

    def _loader(self, dataset: Any, batch_sampler: Any, seed: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.device.type == "cuda",
            # A private generator: creating the iterator must not draw from the global RNG,
            # or a resumed run would see different dropout masks than an uninterrupted one.
            generator=torch.Generator().manual_seed(seed),
        )

    def _to_device(self, inputs: Any, labels: Any) -> tuple[Any, Any]:
        device = self.device
        non_blocking = device.type == "cuda"

        def move(x: Any) -> Any:
            return x.to(device, non_blocking=non_blocking) if isinstance(x, torch.Tensor) else x

        if isinstance(inputs, Mapping):
            moved: Any = {k: move(v) for k, v in inputs.items()}
            values = tuple(moved.values())
        else:
            moved = values = tuple(move(x) for x in _as_inputs(inputs))
        if isinstance(labels, torch.Tensor):
            labels = labels.to(device, non_blocking=non_blocking)
        if self._example_inputs is None:
            self._example_inputs = tuple(x[:2].detach().cpu().clone() for x in values
                                         if isinstance(x, torch.Tensor))
        return moved, labels

    def _compute_loss(self, logits: torch.Tensor, labels: Any, where: str) -> torch.Tensor:
        try:
            loss = self.loss(logits, labels)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from exc
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TrainingError(f"{where}: the loss must return a 0-d tensor (the batch "
                                f"mean); got {shape}. Use reduction='mean'")
        return loss

    def _writer_or_none(self) -> Any:
        if not (self.tensorboard and self.strategy.is_chief):
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.model_dir.mkdir(parents=True, exist_ok=True)
            # purge_step hides what a crashed run logged after the checkpoint resumed from.
            self._writer = SummaryWriter(log_dir=str(self.model_dir),
                                         purge_step=self._purge_step)
        return self._writer

    def _scalars(self, prefix: str, step: int, values: dict[str, Any]) -> None:
        writer = self._writer_or_none()
        if writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"{prefix}/{key}", float(value), step)

    def _flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer, and tear down the strategy if the
        Estimator made it (a strategy passed in is the caller's to tear down)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._owns_strategy:
            self.strategy.teardown()

    def __enter__(self) -> Estimator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_position(self, examples: int, batch_size: int, seed: int,
                        steps_per_epoch: int) -> None:
        pos, world = self._pos, self.strategy.world_size
        now = {"examples": examples, "batch_size": batch_size, "seed": seed,
               "world_size": world}
        before = {k: getattr(pos, k) for k in now}
        if pos.step and before["examples"] is not None and before != now:
            changed = ", ".join(f"{k} {before[k]} -> {now[k]}" for k in now
                                if before[k] != now[k])
            warnings.warn(f"resuming at step {pos.step} with different data settings "
                          f"({changed}): training continues, but not with exactly the "
                          "batches an uninterrupted run would have used", stacklevel=3)
        if pos.batch >= steps_per_epoch:
            pos.epoch, pos.batch = pos.epoch + 1, 0
        for key, value in now.items():
            setattr(pos, key, value)

    # -- train ---------------------------------------------------------------------------------

    def train(self, data: Any, *, max_steps: int, batch_size: int = 32, seed: int = 0,
              checkpoint_every: int | None = None) -> Estimator:
        """Train until ``max_steps`` optimizer steps have been taken in total.

        With a ``model_dir`` that holds checkpoints, training resumes from the latest one
        (weights, optimizer, data position, RNG states), and ends with the same weights as a
        run that was never interrupted (bit for bit on CPU). A checkpoint is saved every
        ``checkpoint_every`` steps, at the end, and on Ctrl-C (then ``KeyboardInterrupt`` is
        re-raised). On a fresh start the global ``random``, NumPy and torch RNGs are seeded
        with ``seed``.

        Args:
            data: A map-style dataset of ``(inputs, label)`` pairs or a callable returning one.
            max_steps: Total optimizer steps (already-taken steps count).
            batch_size: Examples per step across all workers.
            seed: Seeds the epoch orders, and the global RNGs on a fresh start.
            checkpoint_every: Overrides the Estimator's setting for this call.

        Returns:
            The Estimator.

        Raises:
            ValueError: an argument is out of range.
            DataError: the data is empty, smaller than one batch, malformed, or its labels
                do not fit the model (raised before anything is written when it is the
                first batch).
            TrainingError: the loss became NaN or infinite; the last good checkpoint is kept
                and the bad step is not saved.
        """
        _check_int("max_steps", max_steps, 1, "It is the total number of optimizer steps; "
                   "use e.g. max_steps=1000.")
        _check_int("batch_size", batch_size, 1, "Use e.g. batch_size=32.")
        _check_int("seed", seed, 0, "Use e.g. seed=0.")
        every = self.checkpoint_every if checkpoint_every is None else _check_int(
            "checkpoint_every", checkpoint_every, 1, "Use a step count such as 100.")
        dataset = _resolve_data(data, "train")
        per_worker = self.strategy.per_worker_batch(batch_size)
        size = len(dataset)
        if size < batch_size:
            raise DataError(f"train data has {size} examples, fewer than one batch of "
                            f"batch_size={batch_size}; lower batch_size to at most {size}")
        self._restore_if_needed()
        if self.strategy.world_size > 1:
            steps = self.strategy.gather_states(self._pos.step)
            if len(set(steps)) > 1:
                raise TrainingError(f"the workers resumed from different checkpoints (steps "
                                    f"{steps} by rank): model_dir={self.model_dir} must be "
                                    "one directory that every node shares")
        if self._pos.step >= max_steps:
            _log.info("already at step %d >= max_steps=%d; nothing to train",
                     self._pos.step, max_steps)
            return self
        steps_per_epoch = size // batch_size
        self._check_position(size, batch_size, seed, steps_per_epoch)
        if self._pending_rng is not None:
            restore_rng(self._pending_rng, self.device)
            self._pending_rng = None
        elif self._pos.step == 0:
            rank = self.strategy.rank  # each worker its own dropout stream; rank 0 the usual
            _seed_everything(seed if rank == 0 else _seed_for(seed, rank))

        pos = self._pos
        sampler = _TrainBatches(size=size, seed=seed, shard=self.strategy.shard,
                                per_worker=per_worker, steps_per_epoch=steps_per_epoch,
                                epoch=pos.epoch, batch=pos.batch, steps=max_steps - pos.step)
        loader = self._loader(dataset, sampler, _seed_for(seed, pos.epoch, 1))
        chief = self.strategy.is_chief
        world = self.strategy.world_size
        model, optimizer, scheduler = self._train_model, self.optimizer, self.scheduler
        bar = _progress(self.progress and chief, total=max_steps, initial=pos.step,
                        desc="train", unit="step")
        mark_time, mark_step = time.perf_counter(), pos.step
        was_training = self.model.training
        model.train()
        guard = _InterruptGuard()
        try:
            with guard:
                for inputs, labels in loader:
                    inputs, labels = self._to_device(inputs, labels)
                    optimizer.zero_grad(set_to_none=True)
                    logits = _call(model, inputs)
                    loss = self._compute_loss(logits, labels, f"step {pos.step + 1}")
                    loss.backward()
                    if world == 1:
                        value = loss.item()
                    else:  # every worker takes the same NaN decision, or they would deadlock
                        value = self.strategy.all_reduce_sum(
                            loss.detach().float().reshape(1)).item() / world
                    if not math.isfinite(value):
                        optimizer.zero_grad(set_to_none=True)
                        raise TrainingError(self._nan_message(value, pos.step + 1))
                    with guard.critical():
                        optimizer.step()
                        if scheduler is not None:
                            scheduler.step()
                        pos.step += 1
                        pos.batch += 1
                        if pos.batch == steps_per_epoch:
                            pos.epoch, pos.batch = pos.epoch + 1, 0
                    step = pos.step
                    bar.update(1)
                    if step % self.log_every == 0 or step == max_steps:
                        now = time.perf_counter()
                        record = {"loss": value,
                                  "lr": float(optimizer.param_groups[0]["lr"]),
                                  "steps_per_sec": (step - mark_step) / max(now - mark_time,
                                                                            1e-9)}
                        mark_time, mark_step = now, step
                        self.history.append({"step": step, **record})
                        self._scalars("train", step, record)
                        bar.set_postfix(loss=f"{value:.4g}", refresh=False)
                    if step % every == 0:
                        with guard.critical():
                            self._save()
                with guard.critical():
                    self._save()
        except KeyboardInterrupt:
            # The state is that of the last completed step: updates run in critical sections.
            self._save()
            raise
        finally:
            bar.close()
            self._flush()
            self.model.train(was_training)
        return self

    def _nan_message(self, value: float, step: int) -> str:
        if self._last_saved is not None and self._manager is not None:
            kept = (f"the last good checkpoint (step {self._last_saved}, "
                    f"{self._manager.directory / self._manager.name(self._last_saved)}) is "
                    "kept and this step was not saved")
        elif self._manager is not None:
            kept = "no checkpoint had been saved yet, and this step was not saved"
        else:
            kept = "nothing was saved (no model_dir)"
        return (f"the loss is {value} at step {step}; training stopped: {kept}. Lower the "
                "learning rate, clip gradients, or check the inputs and labels for NaN/inf")

    # -- evaluate / predict -------------------------------------------------------------------

    def evaluate(self, data: Any, *, batch_size: int = 32) -> dict[str, Any]:
        """Evaluate the model on every example of ``data`` exactly once.

        Args:
            data: A map-style dataset of ``(inputs, label)`` pairs or a callable returning one.
            batch_size: Examples per batch across all workers (the last batch may be short);
                each worker's batch is ``ceil(batch_size / workers)``.

        Returns:
            ``{"loss": mean loss over examples, "examples": n, "step": training step,
            "accuracy": ..., "top5": ..., "confusion_matrix": LongTensor(C, C)}`` for the
            Estimator's ``metrics``. The loss is the batch means weighted by batch size,
            which is the mean over examples for a loss that averages over its batch.

        Raises:
            DataError: the data is empty, malformed, or its labels do not fit the model.
        """
        _check_int("batch_size", batch_size, 1, "Use e.g. batch_size=64.")
        dataset = _resolve_data(data, "evaluation")
        per_worker = math.ceil(batch_size / self.strategy.world_size)
        if len(dataset) < self.strategy.world_size:
            raise DataError(f"evaluation data has {len(dataset)} examples, fewer than the "
                            f"{self.strategy.world_size} workers; every worker needs one")
        self._restore_if_needed()
        self.strategy.broadcast_buffers(self.model)
        shard = self.strategy.shard(list(range(len(dataset))))
        loader = self._loader(dataset, BatchSampler(shard, per_worker, drop_last=False), 0)
        counts = ClassificationMetrics(self.metrics)
        bar = _progress(self.progress and self.strategy.is_chief, total=len(loader),
                        desc="evaluate", unit="batch", leave=False)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for inputs, labels in loader:
                    inputs, labels = self._to_device(inputs, labels)
                    logits = _call(self.model, inputs)
                    loss = self._compute_loss(logits, labels, "evaluate")
                    counts.update(logits, labels, loss)
                    bar.update(1)
        finally:
            bar.close()
            self.model.train(was_training)
        result = counts.compute(self.strategy.all_reduce_sum, self.device)
        result["step"] = self._pos.step
        self._scalars("eval", self._pos.step,
                      {k: v for k, v in result.items() if k not in ("step", "examples")})
        self._flush()
        return result

    def predict(self, data: Any, *, batch_size: int = 32) -> Any:
        """Run the model in eval mode over ``data`` and return its outputs, in order.

        Args:
            data: Inputs batched along dim 0: a tensor, a tuple of tensors (``model(*xs)``)
                or a dict of tensors (``model(**xs)``); or a dataset of ``(inputs, label)``
                pairs (labels ignored) or a callable returning one.
            batch_size: Examples per forward pass.

        Returns:
            The model's raw outputs for all examples, concatenated along dim 0 on the CPU:
            logits for a classifier (``torch.softmax(out, -1)`` gives probabilities). A
            model returning a tuple or dict gives a tuple or dict of such tensors. Every
            worker predicts all of ``data``.
        """
        _check_int("batch_size", batch_size, 1, "Use e.g. batch_size=64.")
        if _is_tensor_batch(data):
            tensors = list(data.values()) if isinstance(data, Mapping) else _as_inputs(data)
            size = tensors[0].shape[0]
            if any(t.dim() == 0 or t.shape[0] != size for t in tensors):
                raise DataError(f"predict inputs disagree on the batch size (dim 0): "
                                f"{[tuple(t.shape) for t in tensors]}")
            if size == 0:
                raise DataError("predict inputs are empty (dim 0 is 0); give at least one "
                                "example")
            batches: Any = (_slice(data, i, i + batch_size) for i in range(0, size, batch_size))
            total = math.ceil(size / batch_size)
        else:
            dataset = _resolve_data(data, "predict")
            loader = self._loader(dataset, BatchSampler(range(len(dataset)), batch_size,
                                                        drop_last=False), 0)
            batches = (inputs for inputs, _ in loader)
            total = len(loader)
        self._restore_if_needed()
        outputs: list[Any] = []
        bar = _progress(self.progress and self.strategy.is_chief, total=total,
                        desc="predict", unit="batch", leave=False)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for inputs in batches:
                    inputs, _ = self._to_device(inputs, None)
                    outputs.append(_to_cpu(_call(self.model, inputs)))
                    bar.update(1)
        finally:
            bar.close()
            self.model.train(was_training)
        return _concat(outputs)

    # -- export -------------------------------------------------------------------------------

    def export(self, handle: str | os.PathLike[str], *, signatures: Any = None,
               example_inputs: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
               **save_options: Any) -> Any:
        """Save the trained model as a hub module with :func:`graft.save`.

        The model (not its distributed or compiled wrapper) is exported from the CPU in eval
        mode, then put back where it was. Hub modules inside it become its parents.

        Args:
            handle: ``"name@version"`` (into the local store) or a directory path (then
                pass ``name=`` and ``version=``).
            signatures: As for :func:`graft.save`; None: ``forward`` only.
            example_inputs: Inputs to trace with; None: two examples of the first batch
                the Estimator saw (in train, evaluate or predict).
            **save_options: Passed to :func:`graft.save` (``name``, ``version``,
                ``description``, ``license``, ``trainable``, ``assets``, ...).

        Returns:
            The :class:`graft.SavedModule` on the chief worker, None on the others (which
            wait until it is written).
        """
        from graft.export.save import save

        self._restore_if_needed()
        if example_inputs is None and signatures is None:
            example_inputs = self._example_inputs
        saved = None
        if self.strategy.is_chief:
            model = self.model
            device = next(iter(model.parameters()), torch.empty(0)).device
            was_training = model.training
            try:
                if device.type != "cpu":
                    model.to("cpu")
                model.eval()
                saved = save(model, handle, signatures=signatures,
                             example_inputs=example_inputs, **save_options)
            finally:
                model.train(was_training)
                if device.type != "cpu":
                    model.to(device)
        self.strategy.barrier()
        return saved


# -- small helpers ---------------------------------------------------------------------------


def _progress(enabled: bool, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, dynamic_ncols=True, **kwargs)


def _is_tensor_batch(data: Any) -> bool:
    if isinstance(data, torch.Tensor):
        return True
    values = list(data.values()) if isinstance(data, Mapping) else \
        list(data) if isinstance(data, tuple) else []
    return bool(values) and all(isinstance(v, torch.Tensor) for v in values)


def _slice(data: Any, start: int, stop: int) -> Any:
    if isinstance(data, torch.Tensor):
        return data[start:stop]
    if isinstance(data, Mapping):
        return {k: v[start:stop] for k, v in data.items()}
    return tuple(v[start:stop] for v in data)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _concat(outputs: list[Any]) -> Any:
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([o[i] for o in outputs]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([o[k] for o in outputs]) for k in first}
    raise TrainingError(f"predict: the model returned a {type(first).__name__}; expected "
                        "tensors (or tuples/dicts of tensors)")


def _json_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}


# -- train_and_evaluate ----------------------------------------------------------------------


def train_and_evaluate(estimator: Estimator, train_spec: TrainSpec,
                       eval_spec: EvalSpec) -> dict[str, Any]:
    """Train to ``train_spec.max_steps``, evaluating every ``train_spec.eval_every`` steps.

    After each evaluation the checkpoint of that step is copied to ``model_dir/best`` when
    its metric is the best so far (``eval_spec.keep_best``, needs a ``model_dir``), and
    training stops early when ``eval_spec.early_stopping``'s metric has not improved for
    ``patience`` evaluations. Bookkeeping lives in ``model_dir/train_and_evaluate.json``, so
    a re-run with the same ``model_dir`` resumes training and early stopping.

    Returns:
        The last evaluation's metrics (see :meth:`Estimator.evaluate`) with
        ``"best_step"`` (the step of the best evaluation, or None) and ``"stopped_early"``.

    Raises:
        ValueError: the specs are not a TrainSpec and an EvalSpec, or a metric named by
            ``eval_spec`` is not among the evaluation results.
    """
    if not isinstance(estimator, Estimator):
        raise ValueError(f"estimator must be an Estimator; got {type(estimator).__name__}")
    if not isinstance(train_spec, TrainSpec):
        raise ValueError(f"train_spec must be a TrainSpec; got {type(train_spec).__name__}")
    if not isinstance(eval_spec, EvalSpec):
        raise ValueError(f"eval_spec must be an EvalSpec; got {type(eval_spec).__name__}")
    best_rule, stopping = eval_spec.best, eval_spec.early_stopping
    model_dir = estimator.model_dir
    chief = estimator.strategy.is_chief
    state = {"best_step": None, "best_value": None, "stop_value": None,
             "since_improvement": 0, "stopped_early": False, "last": None}
    state_path = model_dir / _STATE_FILE if model_dir is not None else None
    if state_path is not None and state_path.is_file():
        state.update(json.loads(state_path.read_text(encoding="utf-8")))
    if model_dir is not None:
        recover_directory(model_dir / "best")

    estimator._restore_if_needed()
    every = train_spec.eval_every or train_spec.max_steps
    evaluated = state["last"]["step"] if state["last"] else 0
    # A run stopped between a checkpoint and its evaluation evaluates that step first
    # (train() returns at once when the estimator is already there).
    targets = [t for t in range(every, train_spec.max_steps, every)] + [train_spec.max_steps]
    targets = [t for t in targets if t > evaluated and t >= estimator.step]
    if state["stopped_early"] or not targets:
        targets = []
        metrics = estimator.evaluate(eval_spec.data, batch_size=eval_spec.batch_size)
    for target in targets:
        estimator.train(train_spec.data, max_steps=target, batch_size=train_spec.batch_size,
                        seed=train_spec.seed, checkpoint_every=train_spec.checkpoint_every)
        metrics = estimator.evaluate(eval_spec.data, batch_size=eval_spec.batch_size)
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
        if state_path is not None and chief:
            write_text_atomic(state_path, json.dumps(state, indent=1, sort_keys=True) + "\n")
        if state["stopped_early"]:
            break
    return {**metrics, "best_step": state["best_step"],
            "stopped_early": bool(state["stopped_early"])}


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
        with open(tmp / "metrics.json", "w", encoding="utf-8") as f:
            f.write(json.dumps(best, indent=1, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        replace_directory(tmp, target)
    _log.info("best checkpoint (step %d) kept in %s", estimator.step, target)
