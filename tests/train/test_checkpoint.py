"""Checkpoints: exact round trips without pickle, atomic saves, pruning, damage detection."""

from __future__ import annotations

import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from graft.errors import FormatError, IntegrityError
from graft.format.files import refuse_code_or_pickle
from graft.train import checkpoint as ckpt
from graft.train.checkpoint import (
    CheckpointManager,
    read_checkpoint,
    recover_directory,
    replace_directory,
    write_checkpoint,
)
from graft.train.rng import capture_rng, restore_rng

EXACT = {"rtol": 0.0, "atol": 0.0}


def _trained() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def test_round_trip_continues_bit_for_bit(tmp_path):
    model, opt, sched = _trained()
    write_checkpoint(tmp_path / "c", step=3, model=model.state_dict(),
                     optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                     data={"epoch": 1, "batch": 2}, extra={"note": "hi"})
    back = read_checkpoint(tmp_path / "c")
    assert back.step == 3 and back.data == {"epoch": 1, "batch": 2}
    assert back.extra == {"note": "hi"}

    model2, opt2, sched2 = _trained()
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)  # make sure loading really overwrites
    model2.load_state_dict(back.model)
    opt2.load_state_dict(back.optimizer)
    sched2.load_state_dict(back.scheduler)
    assert opt2.state_dict()["param_groups"][0]["betas"] == (0.8, 0.95)
    x = torch.randn(5, 4)
    _step(model, opt, x)
    _step(model2, opt2, x)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, **EXACT)
    assert sched2.state_dict() == sched.state_dict()


def test_files_are_safetensors_and_json_only(tmp_path):
    model, opt, _ = _trained()
    write_checkpoint(tmp_path / "c", step=1, model=model.state_dict(),
                     optimizer=opt.state_dict(), rng=capture_rng())
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == ["model.safetensors", "state.json", "state.safetensors"]
    for path in (tmp_path / "c").iterdir():
        refuse_code_or_pickle(path.name, path.read_bytes())  # raises on a pickle
    json.loads((tmp_path / "c" / "state.json").read_text())


def test_json_values_round_trip_exactly(tmp_path):
    extra = {"ints": {1: "one", 2: (3, 4.5)}, "odd": [math.inf, -math.inf, None, True],
             "raw": b"\x00\xff", "tensor": torch.arange(3)}
    write_checkpoint(tmp_path / "c", step=0, model={}, extra=extra)
    back = read_checkpoint(tmp_path / "c").extra
    assert back["ints"] == {1: "one", 2: (3, 4.5)}
    assert back["odd"] == [math.inf, -math.inf, None, True]
    assert back["raw"] == b"\x00\xff"
    torch.testing.assert_close(back["tensor"], torch.arange(3), **EXACT)
    nan = read_checkpoint(write_checkpoint(tmp_path / "n", step=0, model={},
                                           extra={"x": float("nan")})).extra["x"]
    assert math.isnan(nan)


def test_unsupported_value_is_refused_before_writing(tmp_path):
    with pytest.raises(FormatError, match="extra.fn"):
        write_checkpoint(tmp_path / "c", step=0, model={}, extra={"fn": print})
    assert not (tmp_path / "c").exists()


def test_rng_states_restore(tmp_path):
    state = capture_rng("cpu")
    first = (random.random(), np.random.rand(), torch.rand(3))
    write_checkpoint(tmp_path / "c", step=0, model={}, rng=state)
    restore_rng(read_checkpoint(tmp_path / "c").rng, "cpu")
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1]
    torch.testing.assert_close(first[2], again[2], **EXACT)


def test_manager_keeps_last_k_and_points_latest(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpts", keep=2)
    assert manager.latest() is None
    for step in (10, 20, 30):
        manager.save(step, model={"w": torch.full((2,), float(step))})
    assert [p.name for p in manager.checkpoints()] == ["step-000000020", "step-000000030"]
    assert manager.latest().name == "step-000000030"
    assert (tmp_path / "ckpts" / "latest").read_text().strip() == "step-000000030"
    assert manager.read().model["w"][0].item() == 30.0


def test_latest_falls_back_when_pointer_dangles(tmp_path):
    manager = CheckpointManager(tmp_path, keep=5)
    manager.save(1, model={})
    manager.save(2, model={})
    (tmp_path / "latest").write_text("step-000000099\n")
    assert manager.latest().name == "step-000000002"
    (tmp_path / "latest").unlink()
    assert manager.latest().name == "step-000000002"


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep=5)
    manager.save(10, model={"w": torch.ones(2)})
    real_fsync_tree = ckpt.fsync_tree

    def crash(path):
        real_fsync_tree(path)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "fsync_tree", crash)
    with pytest.raises(OSError, match="disk full"):
        manager.save(20, model={"w": torch.zeros(2)})
    assert manager.latest().name == "step-000000010"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000000010"]
    torch.testing.assert_close(manager.read().model["w"], torch.ones(2))


def test_leftovers_of_a_crashed_writer_are_removed(tmp_path):
    manager = CheckpointManager(tmp_path, keep=5)
    (tmp_path / ".tmp-step-000000005-999999-deadbeef").mkdir(parents=True)
    manager.save(10, model={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000000010"]


def test_damage_is_detected(tmp_path):
    path = write_checkpoint(tmp_path / "c", step=1, model={"w": torch.arange(4.0)})
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors"):
        read_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "state.json").write_text('{"format": "other"}')
    with pytest.raises(FormatError, match="graft.checkpoint/1"):
        read_checkpoint(tmp_path / "bad")


def test_replace_directory_and_recovery(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "a").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "a").write_text("new")
    replace_directory(tmp_path / "new", tmp_path / "best")
    assert (tmp_path / "best" / "a").read_text() == "new"
    # A crash between the two renames leaves only the renamed-aside old copy.
    os.rename(tmp_path / "best", tmp_path / ".best.old-1-abc")
    recover_directory(tmp_path / "best")
    assert (tmp_path / "best" / "a").read_text() == "new"
    shutil.rmtree(tmp_path / "best")


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(tmp_path, keep=0)


def test_protected_checkpoints_outlive_keep_until_released(tmp_path):
    # What the sidecar evaluator relies on: an unevaluated checkpoint is never pruned.
    done: set[str] = set()
    manager = CheckpointManager(tmp_path, keep=1, protect=lambda p: p.name not in done)
    model = nn.Linear(2, 2)
    for step in (1, 2, 3):
        manager.save(step, model=model.state_dict())
    assert [p.name for p in manager.checkpoints()] == [f"step-{s:09d}" for s in (1, 2, 3)]
    done.update({"step-000000001", "step-000000002"})
    manager.save(4, model=model.state_dict())
    assert [p.name for p in manager.checkpoints()] == ["step-000000003", "step-000000004"]
