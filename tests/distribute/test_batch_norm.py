"""SyncBatchNorm in one process: plain batch norm, the same state, convertible, exportable.

Its synchronised path (2 workers == 1) is checked with real processes in
test_data_parallel.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graft.distribute.batch_norm import SyncBatchNorm, convert_sync_batch_norm
from tests.distribute.worker import bn_net


def test_one_worker_is_plain_batch_norm_in_train_and_eval():
    plain = nn.BatchNorm2d(8)
    sync = SyncBatchNorm(8)
    sync.load_state_dict(plain.state_dict())
    assert sync.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(6, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    for mode in (True, False):
        plain.train(mode), sync.train(mode)
        torch.testing.assert_close(sync(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(sync.running_var, plain.running_var, rtol=0, atol=0)


def test_conversion_keeps_parameters_buffers_and_mode():
    model = bn_net()
    model.bn.running_mean.uniform_(-1, 1)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight, mean = model.bn.weight, model.bn.running_mean
    assert convert_sync_batch_norm(model) == 1
    assert type(model.bn) is SyncBatchNorm and not model.bn.training
    assert model.bn.weight is weight and model.bn.running_mean is mean
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    with pytest.warns(UserWarning):  # already converted: nothing left to do
        assert convert_sync_batch_norm(model) == 0


def test_torch_sync_batch_norm_layers_are_converted_too():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), nn.BatchNorm1d(4))
    assert convert_sync_batch_norm(model) == 2
    assert all(type(m) is SyncBatchNorm for m in model[1:])


def test_conversion_refuses_what_it_cannot_convert():
    with pytest.raises(ValueError, match="nn.Sequential"):
        convert_sync_batch_norm(nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="lazy"):
        convert_sync_batch_norm(nn.Sequential(nn.LazyBatchNorm2d()))
    with pytest.warns(UserWarning, match="no nn.BatchNorm layers"):
        assert convert_sync_batch_norm(nn.Sequential(nn.Linear(2, 2))) == 0


def test_a_converted_model_exports_in_train_mode():
    model = bn_net()
    convert_sync_batch_norm(model)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    program = torch.export.export(model.train(), (x,))
    reference = bn_net().train()
    torch.testing.assert_close(program.module()(x), reference(x), rtol=1e-6, atol=1e-6)
