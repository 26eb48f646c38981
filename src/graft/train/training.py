"""The training loop of :class:`~graft.train.estimator.Estimator` (``Estimator.train``).

One step: move the batch, forward, loss, backward, a finite-loss check that every worker
agrees on, then the optimizer update and the position in one section Ctrl-C cannot cut; then
the hooks, logging, and a checkpoint when one is due (every ``checkpoint_every`` steps, or
``checkpoint_every_seconds`` of the Estimator's clock). ``stop_point("train.step")`` after
each step is where a test may SIGKILL the process (``GRAFT_TEST_STOP_AT=train.step#7``).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import warnings
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch.utils.data import DataLoader, default_collate

from graft._testing import stop_point
from graft.errors import DataError, TrainingError
from graft.train.batches import call
from graft.train.checks import check_int
from graft.train.interrupt import InterruptGuard
from graft.train.rng import restore_rng, seed_everything, seed_for
from graft.train.sampling import MapBatches, Stream, resolve_data, stream_batches

if TYPE_CHECKING:
    from graft.train.estimator import Estimator

__all__ = ["TrainLoop"]

_log = logging.getLogger("graft.train")

# (batch, (epoch, batch, offset) just after it)
_Batches = Iterator[tuple[Any, tuple[int, int, int]]]


class TrainLoop:
    """``Estimator.train`` and the pieces of it (a base class of the Estimator)."""

    def train(self: Estimator, data: Any, *, max_steps: int | None, batch_size: int = 32,
              seed: int = 0, checkpoint_every: int | None = None) -> Estimator:
        """Train until ``max_steps`` optimizer steps have been taken in total.

        With a ``model_dir`` holding checkpoints, training resumes from the latest (weights,
        optimizer, data position, RNG states) and ends with the weights of a run that was
        never interrupted (bit for bit on CPU). A checkpoint is saved every
        ``checkpoint_every`` steps (or seconds, see the Estimator), at the end, and on
        Ctrl-C (then ``KeyboardInterrupt`` is re-raised). On a fresh start the global
        ``random``, NumPy and torch RNGs are seeded with ``seed``.

        Args:
            data: Map-style ``(inputs, label)`` data, a stream of pairs (an
                ``IterableDataset`` or any iterable without a length; see
                :mod:`graft.train.sampling`), or an input_fn returning either.
            max_steps: Total optimizer steps (already-taken steps count); None: until a
                callback calls ``estimator.request_stop()``.
            batch_size: Examples per step across all workers.
            seed: Seeds the epoch orders, and the global RNGs on a fresh start.
            checkpoint_every: Overrides the Estimator's setting for this call.

        Returns:
            The Estimator.

        Raises:
            ValueError: an argument is out of range, or ``max_steps=None`` without a callback.
            DataError: the data is empty, smaller than one batch, malformed, or its labels
                do not fit the model.
            TrainingError: the loss became NaN or infinite; the last good checkpoint is kept.
        """
        if max_steps is not None:
            check_int("max_steps", max_steps, 1, "It is the total number of optimizer steps; "
                      "use e.g. max_steps=1000.")
        elif not self.callbacks:
            raise ValueError("max_steps=None trains until a callback calls "
                             "estimator.request_stop(), and this Estimator has no callbacks; "
                             "pass max_steps=..., or callbacks=[StopWhen(...)]")
        check_int("batch_size", batch_size, 1, "Use e.g. batch_size=32.")
        check_int("seed", seed, 0, "Use e.g. seed=0.")
        every = self.checkpoint_every if checkpoint_every is None else check_int(
            "checkpoint_every", checkpoint_every, 1, "Use a step count such as 100.")
        dataset = resolve_data(data, "train")
        self.strategy.per_worker_batch(batch_size)  # a clear error for an uneven split
        size = None if isinstance(dataset, Stream) else len(dataset)
        if size is not None and size < batch_size:
            raise DataError(f"train data has {size} examples, fewer than one batch of "
                            f"batch_size={batch_size}; lower batch_size to at most {size}")
        self._restore_if_needed()
        if self.strategy.world_size > 1:
            steps = self.strategy.gather_states(self._pos.step)
            if len(set(steps)) > 1:
                raise TrainingError(f"the workers resumed from different checkpoints (steps "
                                    f"{steps} by rank): model_dir={self.model_dir} must be "
                                    "one directory that every node shares")
        if max_steps is not None and self._pos.step >= max_steps:
            _log.info("already at step %d >= max_steps=%d", self._pos.step, max_steps)
            return self
        self._stop = False
        steps_per_epoch = None if size is None else size // batch_size
        self._check_position(size, batch_size, seed, steps_per_epoch)
        if self._pending_rng is not None:
            restore_rng(self._pending_rng, self.device)
            self._pending_rng = None
        elif self._pos.step == 0:
            rank = self.strategy.rank  # each worker its own dropout stream; rank 0 the usual
            seed_everything(seed if rank == 0 else seed_for(seed, rank))
        left = None if max_steps is None else max_steps - self._pos.step
        batches = self._train_batches(dataset, batch_size, seed, steps_per_epoch, left)
        return self._run(batches, max_steps, every)

    def _train_batches(self: Estimator, dataset: Any, batch_size: int, seed: int,
                       steps_per_epoch: int | None, left: int | None) -> _Batches:
        pos, rank, world = self._pos, self.strategy.rank, self.strategy.world_size
        if isinstance(dataset, Stream):
            collate = self.collate_fn or default_collate
            items = stream_batches(dataset, epoch=pos.epoch, offset=pos.offset,
                                   batch_size=batch_size, rank=rank, world=world)
            if left is not None:
                items = itertools.islice(items, left)
            return ((collate(mine), (epoch, 0, offset)) for mine, epoch, offset in items)
        sampler = MapBatches(size=len(dataset), seed=seed, batch_size=batch_size, rank=rank,
                             world=world, steps_per_epoch=steps_per_epoch, epoch=pos.epoch,
                             batch=pos.batch, steps=left)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers,
                            collate_fn=self.collate_fn, pin_memory=self.device.type == "cuda",
                            # A private generator: making the iterator must not draw from the
                            # global RNG, or a resumed run would see other dropout masks.
                            generator=torch.Generator().manual_seed(seed_for(seed, pos.epoch,
                                                                             1)))

        def positions() -> Iterator[tuple[int, int, int]]:
            epoch, batch = pos.epoch, pos.batch
            while True:
                batch += 1
                if batch == steps_per_epoch:
                    epoch, batch = epoch + 1, 0
                yield epoch, batch, 0

        return zip(loader, positions())

    def _run(self: Estimator, batches: _Batches, max_steps: int | None,
             every: int) -> Estimator:
        pos, strategy = self._pos, self.strategy
        world, chief = strategy.world_size, strategy.is_chief
        model, optimizer, scheduler = self._train_model, self.optimizer, self.scheduler
        seconds, callbacks = self.checkpoint_every_seconds, self.callbacks
        agree = world > 1 and (bool(callbacks) or seconds is not None)
        log_every, events, history = self.log_every, self._events, self.history
        bar = self._progress(total=max_steps, initial=pos.step, desc="train", unit="step")
        show = not bar.disable  # a disabled bar still formats its postfix: skip the calls
        mark_time, mark_step = time.perf_counter(), pos.step
        was_training = self.model.training
        model.train()
        guard = InterruptGuard()
        critical = guard.critical()
        try:
            with guard:
                for (inputs, labels), after in batches:
                    inputs, labels = self._to_device(inputs, labels)
                    optimizer.zero_grad(set_to_none=True)
                    logits = call(model, inputs)
                    loss = self._compute_loss(logits, labels, pos.step + 1)
                    loss.backward()
                    if world == 1:
                        value = loss.item()
                    else:  # every worker takes the same NaN decision, or they would deadlock
                        value = strategy.all_reduce_sum(
                            loss.detach().float().reshape(1)).item() / world
                    if not math.isfinite(value):
                        optimizer.zero_grad(set_to_none=True)
                        raise TrainingError(self._nan_message(value, pos.step + 1))
                    with critical:
                        optimizer.step()
                        if scheduler is not None:
                            scheduler.step()
                        pos.step += 1
                        pos.epoch, pos.batch, pos.offset = after
                    step = pos.step
                    if show:
                        bar.update(1)
                    if callbacks:
                        logs = {"loss": value, "lr": float(optimizer.param_groups[0]["lr"])}
                        for callback in callbacks:
                            callback.on_step(self, step, logs)
                    if step % log_every == 0 or step == max_steps:
                        now = time.perf_counter()
                        record = {"loss": value, "lr": float(optimizer.param_groups[0]["lr"]),
                                  "steps_per_sec": (step - mark_step) / max(now - mark_time,
                                                                            1e-9)}
                        mark_time, mark_step = now, step
                        history.append({"step": step, **record})
                        events.scalars("train", step, record)
                        if show:
                            bar.set_postfix(loss=f"{value:.4g}", refresh=False)
                    due = step % every == 0
                    timed = seconds is not None and chief \
                        and self.clock() - self._last_saved_at >= seconds
                    stop = self._stop
                    if agree:  # one decision for all: any worker's stop, the chief's clock
                        flags = strategy.all_reduce_sum(torch.tensor(
                            [float(stop), float(timed)], device=self.device)).tolist()
                        stop, timed = flags[0] > 0, flags[1] > 0
                    if due or timed:
                        with critical:
                            self._save()
                    stop_point("train.step")
                    if stop:
                        _log.info("stopping at step %d: a callback requested it", step)
                        break
                with critical:
                    self._save()
        except KeyboardInterrupt:
            self._save()  # the state is the last completed step's: updates are critical
            raise
        finally:
            bar.close()
            self._events.flush()
            self.model.train(was_training)
        self.stopped = self._stop
        return self

    def _check_position(self: Estimator, examples: int | None, batch_size: int, seed: int,
                        steps_per_epoch: int | None) -> None:
        pos, world = self._pos, self.strategy.world_size
        now = {"examples": examples, "batch_size": batch_size, "seed": seed,
               "world_size": world}
        before = {k: getattr(pos, k) for k in now}
        if pos.step and before["batch_size"] is not None and before != now:
            changed = ", ".join(f"{k} {before[k]} -> {now[k]}" for k in now
                                if before[k] != now[k])
            warnings.warn(f"resuming at step {pos.step} with different data settings "
                          f"({changed}): training continues, but not with exactly the "
                          "batches an uninterrupted run would have used", stacklevel=3)
        if steps_per_epoch is not None and pos.batch >= steps_per_epoch:
            pos.epoch, pos.batch = pos.epoch + 1, 0
        for key, value in now.items():
            setattr(pos, key, value)

    def _nan_message(self: Estimator, value: float, step: int) -> str:
        manager = self._manager
        if self._last_saved is not None and manager is not None:
            kept = (f"the last good checkpoint (step {self._last_saved}, "
                    f"{manager.directory / manager.name(self._last_saved)}) is kept and this "
                    "step was not saved")
        elif manager is not None:
            kept = "no checkpoint had been saved yet, and this step was not saved"
        else:
            kept = "nothing was saved (no model_dir)"
        return (f"the loss is {value} at step {step}; training stopped: {kept}. Lower the "
                "learning rate, clip gradients, or check the inputs and labels for NaN/inf")
