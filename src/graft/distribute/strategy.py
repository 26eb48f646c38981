"""Strategies: where training runs, and how workers share data, metrics and side effects.

A :class:`Strategy` is everything the :class:`~graft.train.estimator.Estimator` knows about
devices and processes. The Estimator never calls ``torch.distributed`` itself: it asks its
strategy to place and wrap the model, to split each epoch's example order between workers,
to sum metric counts over workers, and whether this process is the chief (rank 0), the one
that writes checkpoints, event files and exported modules. A data-parallel strategy (DDP
over ``torch.distributed``) implements the same few members, and the Estimator runs
unchanged on one CPU, several GPUs or several nodes.

Batch sizes are global: a user's ``batch_size`` is the number of examples per optimizer step
across all workers; :meth:`Strategy.per_worker_batch` gives each worker's share.

:func:`default_strategy` picks the strategy the environment implies: ``DataParallel()`` in a
process that ``graft launch`` (or ``torchrun``) started, :class:`OneDevice` otherwise.
"""

from __future__ import annotations

import abc
import os
from typing import Any

import torch
from torch import nn

__all__ = ["OneDevice", "Strategy", "default_strategy", "launched"]


class Strategy(abc.ABC):
    """How training runs across devices and processes.

    Subclasses implement :attr:`device`, :meth:`wrap_model`, :meth:`all_reduce_sum` and
    :meth:`barrier`; the rest has single-process defaults that a multi-process strategy
    overrides as needed. Every collective (``all_reduce_sum``, ``barrier``) must be called
    by all workers in the same order.
    """

    def setup(self) -> None:
        """Prepare devices and process groups. Idempotent: calling it twice is harmless."""

    def teardown(self) -> None:
        """Release what :meth:`setup` acquired. Idempotent."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """The device this worker computes on."""

    @property
    def world_size(self) -> int:
        """The number of workers (processes) taking part in training."""
        return 1

    @property
    def rank(self) -> int:
        """This worker's index in ``[0, world_size)``."""
        return 0

    @property
    def is_chief(self) -> bool:
        """True on the one worker that writes files and shows progress (rank 0)."""
        return self.rank == 0

    @abc.abstractmethod
    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to :attr:`device` in place and return the module to train through.

        The returned module may be a wrapper (``DistributedDataParallel``); it shares the
        parameters of ``model``, which stays the object that is saved and exported.
        """

    def shard(self, indices: list[int]) -> list[int]:
        """This worker's share of one epoch's example order.

        The shares of all workers partition ``indices`` exactly: every index goes to one
        worker, none is repeated or padded, and share sizes differ by at most one.

        Args:
            indices: The epoch's permutation of example indices, the same on every worker.
        """
        return indices[self.rank :: self.world_size]

    def per_worker_batch(self, global_batch: int) -> int:
        """Each worker's batch size for a global batch of ``global_batch`` examples.

        Raises:
            ValueError: ``global_batch`` does not divide evenly between the workers.
        """
        world = self.world_size
        if global_batch % world:
            below = global_batch // world * world
            above = below + world
            nearest = f"{below} or {above}" if below else f"{above}"
            raise ValueError(
                f"batch_size={global_batch} is the global batch (examples per step across "
                f"all workers) and must divide evenly between the {world} workers; use a "
                f"multiple of {world}, e.g. {nearest}"
            )
        return global_batch // world

    @abc.abstractmethod
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over all workers (returned on every worker).

        ``tensor`` must be on :attr:`device` and have the same shape and dtype everywhere.
        """

    @abc.abstractmethod
    def barrier(self) -> None:
        """Block until every worker has reached this call."""

    def gather_states(self, state: Any) -> list[Any]:
        """Every worker's ``state``, indexed by rank, on every worker.

        ``state`` is made of JSON values (str, number, bool, None, lists, tuples, dicts with
        str keys) and tensors; tuples come back as lists and tensors on the CPU. Nothing is
        pickled.
        """
        return [state]

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Make ``model``'s buffers (batch-norm running statistics) on every worker equal
        to the chief's, so that every worker evaluates the model the chief checkpoints."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(device={str(self.device)!r}, "
                f"rank={self.rank}, world_size={self.world_size})")


class OneDevice(Strategy):
    """Train in this one process on one device: no wrapping, reductions are the identity.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a ``torch.device``.

    Raises:
        ValueError: the device string is malformed.
        RuntimeError: (on :meth:`setup`) the device is not available on this machine.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        try:
            self._device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"OneDevice(device={device!r}) is not a device; use 'cpu', "
                             "'cuda', 'cuda:0' or a torch.device") from exc

    @property
    def device(self) -> torch.device:
        return self._device

    def setup(self) -> None:
        kind = self._device.type
        if kind == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"OneDevice(device={str(self._device)!r}): CUDA is not "
                               "available on this machine; use OneDevice('cpu')")
        if kind == "cuda" and self._device.index is not None \
                and self._device.index >= torch.cuda.device_count():
            raise RuntimeError(f"OneDevice(device={str(self._device)!r}): this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s); pick one of "
                               f"cuda:0..cuda:{torch.cuda.device_count() - 1}")

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model.to(self._device)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass


def default_strategy() -> Strategy:
    """The strategy the environment implies, used when none is given.

    In a worker process started by ``graft launch`` (or ``torchrun``, or any launcher that
    sets ``RANK`` and ``WORLD_SIZE``): :class:`graft.distribute.data_parallel.DataParallel`
    with its defaults. Otherwise one process on the first GPU if there is one, else the CPU.
    """
    if launched():
        from graft.distribute.data_parallel import DataParallel

        return DataParallel()
    return OneDevice("cuda" if torch.cuda.is_available() else "cpu")


def launched() -> bool:
    """True in a worker process that a distributed launcher started (``RANK`` and
    ``WORLD_SIZE`` are set, as ``graft launch`` and ``torchrun`` set them)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ
