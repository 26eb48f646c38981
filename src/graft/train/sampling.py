"""The order examples are seen in, how workers share them, and where training stands.

Two kinds of data, one rule for sharing: global position ``p`` of a batch goes to worker
``p % world_size``, so the workers' shares partition every batch exactly (no example twice,
none dropped, shares differ by at most one in an evaluation's last batch).

* **Map-style** data (``len(data)`` and ``data[i]``): epoch ``e``'s order is
  :func:`epoch_order` ``(size, seed, e)``, a permutation drawn from a generator seeded with
  ``(seed, e)``; each step takes the next ``batch_size`` examples, and the last partial batch
  of an epoch is dropped so every step has a full batch. The position is ``(epoch, batch)``.
* **Streams** (an ``IterableDataset``, any iterable without a length, or a function returning
  a fresh iterable): epochs follow each other without a gap, so a step's batch may end one
  epoch and begin the next, and every example is seen exactly once per epoch, none dropped.
  The stream is not shuffled (shuffle it yourself, e.g. with a seeded buffer); before each
  epoch ``data.set_epoch(e)`` is called when the stream has it. The position is ``(epoch,
  offset)``, ``offset`` counting the epoch's examples already consumed; resuming re-opens the
  epoch and skips ``offset`` examples, so the stream must give the same order when it is
  iterated again for the same epoch (a reader of fixed files does; a live feed does not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils.data import IterableDataset, Sampler

from graft.errors import DataError
from graft.train.rng import seed_for

__all__ = [
    "MapBatches",
    "Position",
    "Stream",
    "check_item",
    "epoch_order",
    "eval_index_batches",
    "eval_positions",
    "eval_stream_batches",
    "resolve_data",
    "stream_batches",
]


@dataclass
class Position:
    """How far training has gone: steps taken, and where the next batch starts.

    ``batch`` counts the current epoch's batches (map-style data), ``offset`` its examples
    (streams). The other fields record what the position is relative to; a change makes it
    approximate (the Estimator warns).
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    offset: int = 0
    examples: int | None = None
    batch_size: int | None = None
    seed: int | None = None
    world_size: int | None = None


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """Epoch ``epoch``'s order of ``size`` map-style examples.

    ``torch.randperm(size)`` under a CPU generator seeded with
    :func:`graft.train.rng.seed_for` ``(seed, epoch)``: the same on every worker and run.
    """
    generator = torch.Generator().manual_seed(seed_for(seed, epoch))
    return torch.randperm(size, generator=generator).tolist()


class MapBatches(Sampler[list[int]]):
    """This worker's index batches of map-style data, from a position on, epoch after epoch.

    Batch ``b`` of epoch ``e`` is the ``b``-th slice of ``batch_size`` indices of
    :func:`epoch_order`, of which this worker takes positions ``rank, rank + world, ...``.
    Only ``steps_per_epoch`` full batches are taken per epoch; ``steps=None`` never ends.
    """

    def __init__(self, *, size: int, seed: int, batch_size: int, rank: int, world: int,
                 steps_per_epoch: int, epoch: int, batch: int, steps: int | None) -> None:
        self.size, self.seed, self.batch_size = size, seed, batch_size
        self.rank, self.world, self.steps_per_epoch = rank, world, steps_per_epoch
        self.epoch, self.batch, self.steps = epoch, batch, steps

    def __iter__(self) -> Iterator[list[int]]:
        epoch, batch = self.epoch, self.batch
        left = self.steps if self.steps is not None else math.inf  # None: until stopped
        size = self.batch_size
        while left > 0:
            order = epoch_order(self.size, self.seed, epoch)
            while batch < self.steps_per_epoch and left > 0:
                yield order[batch * size:(batch + 1) * size][self.rank::self.world]
                batch += 1
                left -= 1
            epoch, batch = epoch + 1, 0

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an open-ended run (max_steps=None) has no length")
        return self.steps


class Stream:
    """Data without a length, opened once per epoch.

    Args:
        make: Returns the iterable for an epoch (an ``IterableDataset``, a generator, ...).
        role: ``"train"``, ``"evaluation"``, ...: named in errors.
    """

    def __init__(self, make: Callable[[], Iterable[Any]], role: str) -> None:
        self._make, self.role = make, role

    def open(self, epoch: int) -> Iterator[Any]:
        """A fresh iterator over epoch ``epoch`` (``set_epoch(epoch)`` first, if defined)."""
        source = self._make()
        set_epoch = getattr(source, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        return iter(source)


def resolve_data(data: Any, role: str) -> Any:
    """Map-style data (checked to be non-empty ``(inputs, label)`` pairs) or a :class:`Stream`.

    ``data`` is a map-style dataset, a stream, or a callable (an ``input_fn``) returning one;
    a callable returning a stream is called again for every epoch.

    Raises:
        DataError: the data is empty, malformed, a tensor, or a one-shot iterator.
    """
    make = data if callable(data) and not hasattr(data, "__getitem__") \
        and not isinstance(data, IterableDataset) else None
    value = make() if make is not None else data
    if _is_stream(value):
        if iter(value) is value and make is None:
            raise DataError(f"{role} data is a one-shot iterator ({type(value).__name__}), "
                            "which cannot be read again for the next epoch or after a resume;"
                            " pass an IterableDataset, or a function that returns a fresh "
                            "iterator (e.g. `lambda: read_records(path)`)")
        first = True

        def again() -> Iterable[Any]:
            nonlocal first
            if first:  # the value made while checking the kind is the first epoch's
                first = False
                return value
            return make() if make is not None else value

        return Stream(again, role)
    if isinstance(value, torch.Tensor) or not (hasattr(value, "__len__")
                                               and hasattr(value, "__getitem__")):
        raise DataError(f"{role} data must be a map-style dataset (len() and [i] -> (inputs, "
                        f"label)), an iterable of (inputs, label) pairs, or a callable "
                        f"returning one; got {type(value).__name__}. Wrap tensors as "
                        "torch.utils.data.TensorDataset(x, y)")
    if len(value) == 0:
        raise DataError(f"{role} data is empty (len 0); give at least one (inputs, label) "
                        "example")
    check_item(value[0], role, 0)
    return value


def _is_stream(value: Any) -> bool:
    if isinstance(value, IterableDataset):
        return True
    return hasattr(value, "__iter__") and not hasattr(value, "__len__") \
        and not isinstance(value, (str, bytes, torch.Tensor))


def check_item(item: Any, role: str, position: int) -> None:
    """Refuse an item that is not an ``(inputs, label)`` pair."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        kind = type(item).__name__ + (f" of length {len(item)}"
                                      if isinstance(item, (tuple, list)) else "")
        raise DataError(f"{role} data item {position} is a {kind}; every item must be an "
                        "(inputs, label) pair (TensorDataset(x, y) gives such pairs)")


def stream_batches(stream: Stream, *, epoch: int, offset: int, batch_size: int, rank: int,
                   world: int) -> Iterator[tuple[list[Any], int, int]]:
    """This worker's items of each global batch of a stream, from ``(epoch, offset)`` on.

    Yields:
        ``(items, epoch, offset)``: this worker's items of the next batch of ``batch_size``
        examples, and the position just after that batch.

    Raises:
        DataError: an epoch is empty, an item is not a pair, or the epoch is shorter than the
            position a checkpoint recorded.
    """
    it = stream.open(epoch)
    for skipped in range(offset):
        if next(it, _END) is _END:
            raise DataError(f"{stream.role} stream epoch {epoch} ended after {skipped} "
                            f"examples, but the checkpoint resumes after {offset}: the stream "
                            "must give the same examples when read again for an epoch")
    while True:
        mine = []
        for i in range(batch_size):
            item = next(it, _END)
            if item is _END:
                if offset == 0:
                    raise DataError(f"{stream.role} stream epoch {epoch} is empty; it must "
                                    "yield at least one (inputs, label) pair per epoch")
                epoch, offset = epoch + 1, 0
                it = stream.open(epoch)
                item = next(it, _END)
                if item is _END:
                    raise DataError(f"{stream.role} stream epoch {epoch} is empty; it must "
                                    "yield at least one (inputs, label) pair per epoch")
            if offset == 0 and epoch == 0:
                check_item(item, stream.role, 0)
            offset += 1
            if i % world == rank:
                mine.append(item)
        yield mine, epoch, offset


def eval_positions(size: int | None, steps: int | None, batch_size: int) -> int | None:
    """How many examples an evaluation reads: all, or the first ``steps`` batches."""
    if steps is None:
        return size
    wanted = steps * batch_size
    return wanted if size is None else min(size, wanted)


def eval_index_batches(size: int, *, batch_size: int, steps: int | None, rank: int,
                       world: int) -> list[list[int]]:
    """This worker's index batches of a map-style evaluation (see :func:`eval_stream_batches`)."""
    limit = eval_positions(size, steps, batch_size)
    batches = [list(range(start, min(start + batch_size, limit)))[rank::world]
               for start in range(0, limit, batch_size)]
    return [b for b in batches if b]


def eval_stream_batches(stream: Stream, *, batch_size: int, steps: int | None, rank: int,
                        world: int) -> Iterator[list[Any]]:
    """This worker's items of each evaluation batch of a stream, read once from its start.

    Global position ``p`` goes to worker ``p % world``: over all workers every example (of
    the whole stream, or of its first ``steps`` batches) is read exactly once. The last batch
    may be short, and a worker may get one batch fewer than another.
    """
    limit = eval_positions(None, steps, batch_size)
    position = 0
    mine: list[Any] = []
    for item in stream.open(0):
        if limit is not None and position >= limit:
            break
        if position == 0:
            check_item(item, stream.role, 0)
        if position % world == rank:
            mine.append(item)
        position += 1
        if position % batch_size == 0:
            if mine:
                yield mine
            mine = []
    if position == 0:
        raise DataError(f"{stream.role} stream is empty; give at least one (inputs, label) "
                        "example")
    if mine:
        yield mine


_END = object()
