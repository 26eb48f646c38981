"""TensorBoard scalars: recorded on the logging step, written in batches, on disk by each
checkpoint (so a crash loses only what the resumed run's purge_step hides anyway)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from graft.train.estimator import Estimator
from graft.train.events import Events
from graft.train.hooks import Callback


def _steps_on_disk(directory: Path, tag: str = "train/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return []
    return [e.step for e in events.Scalars(tag)]


class _SeenAtCheckpoint(Callback):
    def __init__(self, directory: Path) -> None:
        self.directory, self.seen = directory, {}

    def on_checkpoint(self, estimator, path):
        self.seen[estimator.step] = _steps_on_disk(self.directory)


def test_every_scalar_before_a_checkpoint_is_on_disk_when_it_is_written(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g))
    torch.manual_seed(0)
    seen = _SeenAtCheckpoint(tmp_path)
    est = Estimator(nn.Linear(4, 3), model_dir=tmp_path, log_every=2, checkpoint_every=5,
                    progress=False, callbacks=[seen])
    est.train(data, max_steps=12, batch_size=8)
    # Read by TensorBoard's own reader from the file while the run was still writing it.
    assert seen.seen == {5: [2, 4], 10: [2, 4, 6, 8, 10], 12: [2, 4, 6, 8, 10, 12]}
    est.close()
    assert _steps_on_disk(tmp_path) == [2, 4, 6, 8, 10, 12]
    # The values are the logged ones (stored as float32 by TensorBoard).
    assert _values(tmp_path, "train/loss") == pytest.approx([h["loss"] for h in est.history],
                                                            rel=1e-6)


def _values(directory: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def test_scalars_are_handed_over_in_batches_of_max_pending(tmp_path):
    events = Events(tmp_path, True, max_pending=3)
    events.scalars("train", 1, {"loss": 1.5, "lr": 0.1, "note": "text", "flag": True})
    assert not list(tmp_path.glob("events.out.tfevents.*"))  # two waiting: nothing written yet
    events.scalars("train", 2, {"loss": 1.25, "lr": 0.1})  # four waiting >= 3: written
    events._writer.flush()
    assert _steps_on_disk(tmp_path) == [1, 2]
    events.scalars("train", 3, {"loss": 1.0})
    events._writer.flush()
    assert _steps_on_disk(tmp_path) == [1, 2]
    events.close()
    assert _values(tmp_path, "train/loss") == [1.5, 1.25, 1.0]
    assert _steps_on_disk(tmp_path, "train/lr") == [1, 2]


def test_disabled_events_write_nothing(tmp_path):
    events = Events(tmp_path, False)
    events.scalars("train", 1, {"loss": 1.0})
    events.flush()
    events.close()
    assert not list(tmp_path.iterdir())
