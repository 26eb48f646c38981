"""The Strategy seam: global batches, exact shards, and the strategy the environment implies."""

from __future__ import annotations

import pytest
import torch

from graft.distribute.data_parallel import DataParallel
from graft.distribute.strategy import OneDevice, Strategy, default_strategy, launched


class _Worker(Strategy):
    """Rank ``rank`` of ``world``, without processes: enough for sharding and batch sizes."""

    def __init__(self, rank: int, world: int) -> None:
        self._rank, self._world = rank, world

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    def wrap_model(self, model):
        return model

    def all_reduce_sum(self, tensor):
        return tensor

    def barrier(self):
        pass


@pytest.mark.parametrize("size, world", [(10, 3), (101, 2), (101, 3), (7, 7), (64, 4)])
def test_shards_partition_every_epoch_exactly(size, world):
    order = torch.randperm(size, generator=torch.Generator().manual_seed(size)).tolist()
    shards = [_Worker(rank, world).shard(order) for rank in range(world)]
    assert sorted(sum(shards, [])) == list(range(size))  # each index once: no padding
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("size, world, batch", [(10, 3, 3), (10, 3, 9), (100, 4, 8),
                                                (13, 2, 4)])
def test_every_worker_takes_the_same_number_of_full_batches(size, world, batch):
    # The Estimator takes size // batch global batches per epoch: each worker's shard holds
    # at least that many per-worker batches, so no worker runs out (and none waits).
    steps = size // batch
    per_worker = _Worker(0, world).per_worker_batch(batch)
    order = list(range(size))
    for rank in range(world):
        assert len(_Worker(rank, world).shard(order)) >= steps * per_worker
    # Step b's per-worker batches together are exactly the one-worker batch b.
    for b in range(steps):
        together = sorted(i for rank in range(world)
                          for i in _Worker(rank, world).shard(order)[b * per_worker:
                                                                     (b + 1) * per_worker])
        assert together == order[b * batch:(b + 1) * batch]


def test_a_global_batch_that_does_not_divide_is_refused_with_the_nearest_sizes():
    assert _Worker(0, 4).per_worker_batch(64) == 16
    with pytest.raises(ValueError, match=r"multiple of 3, e\.g\. 63 or 66"):
        _Worker(0, 3).per_worker_batch(64)
    with pytest.raises(ValueError, match=r"multiple of 4, e\.g\. 4$"):
        _Worker(0, 4).per_worker_batch(2)


def test_one_device_is_one_worker():
    one = OneDevice()
    assert (one.world_size, one.rank, one.is_chief) == (1, 0, True)
    assert one.gather_states({"x": 1}) == [{"x": 1}]
    with pytest.raises(ValueError, match="not a device"):
        OneDevice("quantum")


def test_default_strategy_follows_the_launcher_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert not launched() and isinstance(default_strategy(), OneDevice)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    strategy = default_strategy()  # built, not set up: no process group is joined here
    assert launched() and isinstance(strategy, DataParallel)
    assert (strategy.rank, strategy.world_size, strategy.is_chief) == (1, 4, False)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("name", ["graft.distribute.strategy", "graft.distribute.data_parallel",
                                  "graft.distribute.batch_norm", "graft.distribute.launch"])
def test_each_module_exports_exactly_its_public_names(name):
    import importlib

    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == sorted(exported)
    assert all(getattr(module, item) is not None for item in exported)
    public = {k for k, v in vars(module).items() if not k.startswith("_")
              and getattr(v, "__module__", None) == name}
    assert public <= set(exported), f"public but not in __all__: {public - set(exported)}"
