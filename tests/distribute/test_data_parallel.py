"""DataParallel: N worker processes (gloo, CPU) compute what one process computes.

The multi-process runs start real workers with the environment a launcher sets; each runs
``worker.py suite`` once for its world size and the tests below check its results against
single-process references built from the same code.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from graft.distribute.batch_norm import SyncBatchNorm
from graft.distribute.data_parallel import DataParallel, chief_timeout, collective_timeout
from graft.distribute.strategy import OneDevice
from tests.distribute.conftest import load_weights, run_workers
from tests.distribute.worker import EVAL_SIZE, STEPS, bn_net, estimator, images, mlp, vectors

CLOSE = {"rtol": 0.0, "atol": 1e-6}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    out = tmp_path_factory.mktemp("two-workers")
    run_workers(2, ["suite", str(out)], timeout=120)
    return out


@pytest.fixture(scope="module")
def three_workers(tmp_path_factory):
    out = tmp_path_factory.mktemp("three-workers")
    run_workers(3, ["suite", str(out)], timeout=120)
    return out


def results(out) -> dict:
    return json.loads((out / "results.json").read_text())


def one_process(model: nn.Module, data, steps: int, batch_size: int) -> dict:
    est = estimator(model, strategy=OneDevice("cpu"))
    est.train(data, max_steps=steps, batch_size=batch_size, seed=5)
    return est.model.state_dict()


def assert_close_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], **CLOSE, msg=key)


# -- in multi-process runs -------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_launcher_environment_implies_data_parallel_on_gloo(two_workers):
    got = results(two_workers)
    assert (got["strategy"], got["backend"], got["world_size"]) == ("DataParallel", "gloo", 2)


@pytest.mark.timeout(150)
def test_two_workers_on_half_batches_equal_one_worker_on_the_whole_batch(two_workers):
    want = one_process(mlp(), vectors(64, 1), STEPS, 16)
    assert_close_weights(load_weights(two_workers / "plain.safetensors"), want)


@pytest.mark.timeout(150)
def test_sync_batch_norm_two_workers_equal_plain_batch_norm_on_one(two_workers):
    # Plain batch norm on the whole batch of 16 == synchronised batch norm on 2 x 8.
    want = one_process(bn_net(), images(64, 2), STEPS, 16)
    got = load_weights(two_workers / "syncbn.safetensors")
    assert_close_weights(got, want)  # parameters and running statistics
    assert results(two_workers)["sync_layers"] == 1
    assert results(two_workers)["exported"] is True  # the chief exported alone, no hang
    import graft

    module = graft.load(str(two_workers / "module"))
    reference = bn_net()
    reference.load_state_dict(got)
    x = images(4, 9).tensors[0]
    torch.testing.assert_close(module(x), reference.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", [2, 3])
def test_evaluation_counts_every_example_once_on_any_number_of_workers(world, two_workers,
                                                                      three_workers):
    data = vectors(EVAL_SIZE, 7, classes=5)
    want = estimator(mlp(classes=5), strategy=OneDevice()).evaluate(data, batch_size=10)
    got = results(two_workers if world == 2 else three_workers)
    for key in ("evaluate", "evaluate_batch_7"):
        metrics = got[key]
        assert metrics["examples"] == EVAL_SIZE
        assert metrics["accuracy"] == want["accuracy"]
        assert metrics["loss"] == pytest.approx(want["loss"], rel=1e-6)


@pytest.mark.timeout(150)
def test_uneven_shards_finish_and_match_one_worker(three_workers):
    # 10 examples over 3 workers (shards 4, 3, 3), global batch 3: 3 steps per epoch on
    # every worker, the 10th example of each epoch dropped as on one worker.
    got = results(three_workers)
    assert got["uneven_steps"] == 7
    assert got["uneven_evaluate"]["examples"] == 10
    want = one_process(mlp(), vectors(10, 3), 7, 3)
    assert_close_weights(load_weights(three_workers / "uneven.safetensors"), want)


# -- in this process: a group of one ----------------------------------------------------------


@pytest.fixture
def solo():
    strategy = DataParallel()
    yield strategy
    strategy.teardown()


def test_a_script_run_alone_gets_a_one_process_group(solo):
    solo.setup()
    solo.setup()  # idempotent
    assert (solo.world_size, solo.rank, solo.is_chief) == (1, 0, True)
    assert solo.device == torch.device("cpu") and solo.backend == "gloo"
    assert torch.equal(solo.all_reduce_sum(torch.tensor([1.5, 2.0])), torch.tensor([1.5, 2.0]))
    solo.barrier()
    state = {"a": [1, 2.5, None, "x"], "t": torch.arange(6, dtype=torch.int16).reshape(2, 3),
             "b": (True, torch.tensor(3.0))}
    (back,) = solo.gather_states(state)
    assert back["a"] == [1, 2.5, None, "x"] and back["b"][0] is True
    assert torch.equal(back["t"], state["t"]) and back["t"].dtype == torch.int16
    assert torch.equal(back["b"][1], torch.tensor(3.0))
    solo.teardown()
    solo.teardown()  # idempotent
    assert not torch.distributed.is_initialized()


def test_ddp_world_of_one_trains_exactly_like_one_device(solo):
    want = one_process(mlp(), vectors(64, 1), 10, 16)
    est = estimator(mlp(), strategy=solo)
    assert isinstance(est._train_model, nn.parallel.DistributedDataParallel)
    est.train(vectors(64, 1), max_steps=10, batch_size=16, seed=5)
    assert_close_weights(est.model.state_dict(), want)


def test_sync_batch_norm_is_converted_in_place():
    model = bn_net()
    weight = model.bn.weight
    strategy = DataParallel(sync_batch_norm=True)
    try:
        est = estimator(model, strategy=strategy)
    finally:
        strategy.teardown()
    assert isinstance(model.bn, SyncBatchNorm) and model.bn.weight is weight
    assert est.model is model and est.optimizer.param_groups[0]["params"][2] is weight


def test_data_parallel_refuses_bad_arguments(monkeypatch):
    for kwargs, match in [({"device": "cuda:1"}, "LOCAL_RANK"), ({"device": "tpu9"}, "device"),
                          ({"backend": "carrier-pigeon"}, "backend"),
                          ({"timeout": 0}, "timeout"), ({"chief_timeout": -1}, "chief_timeout")]:
        with pytest.raises(ValueError, match=match):
            DataParallel(**kwargs)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        DataParallel(device="cuda").setup()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="graft launch"):
        DataParallel().setup()
    assert not torch.distributed.is_initialized()


def test_timeouts_come_from_the_environment(monkeypatch):
    assert (collective_timeout(), chief_timeout()) == (60.0, 600.0)
    monkeypatch.setenv("GRAFT_COLLECTIVE_TIMEOUT", "7.5")
    monkeypatch.setenv("GRAFT_CHIEF_TIMEOUT", "90")
    assert (collective_timeout(), chief_timeout()) == (7.5, 90.0)
    assert DataParallel().timeout == 7.5 and DataParallel(timeout=3).timeout == 3.0
    monkeypatch.setenv("GRAFT_COLLECTIVE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="GRAFT_COLLECTIVE_TIMEOUT"):
        collective_timeout()
