"""The Estimator against a hand-written loop, and callbacks, time-based checkpoints,
open-ended runs, warm starts, partial evaluation, streams, custom metrics and exporters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

import graft
from graft.errors import DataError, TrainingError
from graft.losses import softmax_cross_entropy
from graft.train import (
    BestExporter,
    Callback,
    EvalSpec,
    FinalExporter,
    LatestExporter,
    StopWhen,
    TrainSpec,
    WarmStart,
    train_and_evaluate,
)
from graft.train.estimator import Estimator

EXACT = {"rtol": 0.0, "atol": 0.0}


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def vectors(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g))


def quiet(model: nn.Module, **kwargs) -> Estimator:
    return Estimator(model, progress=False, tensorboard=False, **kwargs)


class Weights(Callback):
    """Records a copy of the weights after every step, and every hook call."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.losses: list[float] = []
        self.checkpoints: list[int] = []
        self.evaluations: list[int] = []

    def on_step(self, estimator, step, logs):
        assert step == len(self.steps) + 1
        self.steps.append({k: v.clone() for k, v in estimator.model.state_dict().items()})
        self.losses.append(logs["loss"])

    def on_checkpoint(self, estimator, path):
        assert path.is_dir() and path.name == f"step-{estimator.step:09d}"
        self.checkpoints.append(estimator.step)

    def on_evaluate(self, estimator, metrics):
        self.evaluations.append(metrics["step"])


def _documented_order(size: int, seed: int, epoch: int) -> list[int]:
    # graft.train.sampling.epoch_order as its docstring defines it, written out again.
    high, low = np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint32)
    generator = torch.Generator().manual_seed((int(high) << 32) | int(low))
    return torch.randperm(size, generator=generator).tolist()


def test_estimator_matches_a_hand_written_adam_loop_step_for_step():
    data = vectors(40, 1)  # 40 // 16 = 2 full batches per epoch, the rest dropped
    hooks = Weights()
    quiet(mlp(), callbacks=[hooks]).train(data, max_steps=7, batch_size=16, seed=3)

    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # the default optimizer
    x, y = data.tensors
    for step in range(7):
        epoch, batch = divmod(step, 2)
        index = _documented_order(40, 3, epoch)[batch * 16:(batch + 1) * 16]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        loss.backward()
        optimizer.step()
        assert hooks.losses[step] == pytest.approx(loss.item(), rel=1e-6)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(hooks.steps[step][key], value, **EXACT)


def test_checkpoint_every_seconds_follows_the_injected_clock(tmp_path):
    now = [0.0]

    class Tick(Callback):
        def on_step(self, estimator, step, logs):
            now[0] += 1.0  # each step "takes" one second of the fake clock

    hooks = Weights()
    est = quiet(mlp(), model_dir=tmp_path, checkpoint_every=1000,
                checkpoint_every_seconds=2.5, clock=lambda: now[0],
                callbacks=[Tick(), hooks])
    est.train(vectors(32, 1), max_steps=7, batch_size=8)
    assert hooks.checkpoints == [3, 6, 7]  # 2.5 s passed at steps 3 and 6; 7 is the end
    with pytest.raises(ValueError, match="checkpoint_every_seconds"):
        quiet(mlp(), checkpoint_every_seconds=0)


def test_open_ended_training_stops_when_a_callback_asks(tmp_path):
    est = quiet(mlp(), model_dir=tmp_path, callbacks=[StopWhen(lambda step, logs: step == 5)])
    est.train(vectors(32, 1), max_steps=None, batch_size=8)
    assert est.step == 5 and est.stopped
    assert est.latest_checkpoint().name == "step-000000005"
    with pytest.raises(ValueError, match="max_steps=None.*callback"):
        quiet(mlp()).train(vectors(32, 1), max_steps=None)
    with pytest.raises(ValueError, match="eval_every"):
        TrainSpec(vectors(32, 1), max_steps=None)


def test_train_and_evaluate_with_open_ended_steps_ends_on_the_callback(tmp_path):
    hooks = Weights()
    est = quiet(mlp(), model_dir=tmp_path,
                callbacks=[hooks, StopWhen(lambda step, logs: step >= 7)])
    result = train_and_evaluate(est, TrainSpec(vectors(32, 1), max_steps=None, batch_size=8,
                                               eval_every=3),
                                EvalSpec(vectors(20, 2), batch_size=5,
                                         exporters=[FinalExporter("open-final")]))
    assert result["step"] == 7 and hooks.evaluations == [3, 6, 7]
    assert [r["step"] for r in result["exported"]] == [7]


def test_warm_start_takes_weights_only_on_a_fresh_start(tmp_path):
    donor = quiet(mlp(1), model_dir=tmp_path / "a")
    donor.train(vectors(32, 1), max_steps=4, batch_size=8)
    trained = {k: v.clone() for k, v in donor.model.state_dict().items()}

    est = quiet(mlp(2), model_dir=tmp_path / "b", warm_start_from=tmp_path / "a")
    assert est.evaluate(vectors(20, 2), batch_size=5)["step"] == 0
    assert est.warm_started == sorted(trained)
    for key, value in est.model.state_dict().items():
        torch.testing.assert_close(value, trained[key], **EXACT)
    est.train(vectors(32, 1), max_steps=2, batch_size=8)
    # Once b has its own checkpoint, a new Estimator resumes it and ignores the donor.
    again = quiet(mlp(2), model_dir=tmp_path / "b", warm_start_from=tmp_path / "a")
    assert again.evaluate(vectors(20, 2))["step"] == 2 and again.warm_started == []

    head = quiet(mlp(2), warm_start_from=WarmStart(tmp_path / "a", include=r"^2\."))
    head.evaluate(vectors(20, 2))
    assert head.warm_started == ["2.bias", "2.weight"]
    assert not torch.equal(head.model.state_dict()["0.weight"], trained["0.weight"])
    with pytest.raises(TrainingError, match="none of its"):
        quiet(mlp(), warm_start_from=WarmStart(tmp_path / "a", include="nothing")) \
            .evaluate(vectors(20, 2))
    wide = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4))
    with pytest.raises(TrainingError, match=r"warm start: '0\.\w+' is"):
        quiet(wide, warm_start_from=tmp_path / "a").evaluate(vectors(20, 2))
    with pytest.raises(FileNotFoundError):
        quiet(mlp(), warm_start_from=tmp_path / "missing").evaluate(vectors(20, 2))


def test_partial_evaluation_reads_the_first_steps_batches():
    est = quiet(mlp())
    data = vectors(50, 3)
    part = est.evaluate(data, batch_size=8, steps=3)
    assert part["examples"] == 24
    first = TensorDataset(*(t[:24] for t in data.tensors))
    assert part["loss"] == pytest.approx(est.evaluate(first, batch_size=24)["loss"], rel=1e-6)
    assert est.evaluate(data, batch_size=8, steps=100)["examples"] == 50
    assert EvalSpec(data, steps=3).steps == 3
    with pytest.raises(ValueError, match="steps"):
        EvalSpec(data, steps=0)


class Numbers(IterableDataset):
    """``n`` (x, y) pairs with no length; records set_epoch."""

    def __init__(self, data: TensorDataset) -> None:
        self.data, self.epochs = data, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        return iter(self.data)


def test_streams_train_and_evaluate_like_the_same_map_style_data():
    data = vectors(30, 4)
    stream = Numbers(data)
    est = quiet(mlp())
    assert est.evaluate(stream, batch_size=7) == est.evaluate(data, batch_size=7)
    est.train(stream, max_steps=8, batch_size=8)  # 64 examples: epochs 0, 1, and 4 of 2
    assert stream.epochs[-3:] == [0, 1, 2]
    # A function returning a fresh generator is a stream too, opened once per epoch.
    calls = []

    def records():
        calls.append(1)
        return (pair for pair in data)

    quiet(mlp()).train(records, max_steps=8, batch_size=8)
    assert len(calls) == 3
    with pytest.raises(DataError, match="one-shot iterator"):
        quiet(mlp()).train(iter(data), max_steps=1, batch_size=8)
    with pytest.raises(DataError, match="empty"):
        quiet(mlp()).train(Numbers(TensorDataset(torch.zeros(0, 6), torch.zeros(0))),
                           max_steps=1, batch_size=8)


def test_custom_metric_functions_and_objects_are_exact():
    from sklearn.metrics import f1_score
    from torchmetrics.classification import MulticlassF1Score

    data = vectors(53, 5)

    def hit(logits, labels):
        return (logits.argmax(-1) == labels).float()  # per example

    est = quiet(mlp(), metrics=["accuracy", hit, MulticlassF1Score(4, average="macro")])
    result = est.evaluate(data, batch_size=10)
    logits = est.model(data.tensors[0]).detach()
    labels = data.tensors[1]
    assert result["hit"] == pytest.approx(result["accuracy"], abs=1e-12)
    assert result["multiclass_f1_score"] == pytest.approx(
        f1_score(labels, logits.argmax(-1), average="macro"), abs=1e-6)
    again = est.evaluate(data, batch_size=53)  # the metric object was reset, not summed on
    assert again["multiclass_f1_score"] == pytest.approx(result["multiclass_f1_score"])
    with pytest.raises(ValueError, match="cannot name"):
        quiet(mlp(), metrics=[lambda a, b: a])
    with pytest.raises(ValueError, match="two metrics are named 'hit'"):
        quiet(mlp(), metrics=[hit, hit])
    with pytest.raises(DataError, match="per-example values"):
        quiet(mlp(), metrics={"bad": lambda lo, la: lo}).evaluate(data, batch_size=10)


def test_dense_keyword_only_loss_is_called_by_keyword():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, generator=g)
    y = torch.softmax(torch.randn(16, 4, generator=g), -1)  # soft labels, same shape
    est = quiet(mlp(), loss=softmax_cross_entropy, metrics=())
    result = est.evaluate(TensorDataset(x, y), batch_size=16)
    want = softmax_cross_entropy(labels=y, logits=mlp()(x)).item()
    assert result["loss"] == pytest.approx(want, rel=1e-6)


def test_exporters_keep_the_newest_and_record_lineage(tmp_path):
    base = mlp()
    parent = graft.save(base, "exp-parent@1.0.0", example_inputs=(torch.randn(2, 6),))
    backbone = graft.load("exp-parent@1.0.0", trainable=True)
    model = nn.Sequential(backbone, nn.Linear(4, 4))
    est = quiet(model, model_dir=tmp_path, metrics=["accuracy"])
    exporters = [LatestExporter("exp-latest", keep=2), BestExporter("exp-best", metric="accuracy"),
                 FinalExporter("exp-final", description="the end")]
    result = train_and_evaluate(est, TrainSpec(vectors(32, 1), max_steps=6, batch_size=8,
                                               eval_every=2),
                                EvalSpec(vectors(20, 2), batch_size=5, exporters=exporters))
    latest = [r for r in result["exported"] if r["exporter"] == "latest"]
    assert [r["step"] for r in latest] == [2, 4, 6]
    assert exporters[1].mode == "max"
    stored = {(m.name, m.version): m for m in graft.Store().list()}
    assert ("exp-latest", "1.0.0+step2") not in stored  # keep=2
    assert {("exp-latest", "1.0.0+step4"), ("exp-latest", "1.0.0+step6"),
            ("exp-final", "1.0.0")} <= set(stored)
    final = stored[("exp-final", "1.0.0")]
    assert [p.digest for p in final.parents] == [parent.digest]  # the lineage
    # A re-run of the finished job exports nothing again.
    rerun = train_and_evaluate(quiet(nn.Sequential(graft.load("exp-parent@1.0.0",
                                                              trainable=True),
                                                   nn.Linear(4, 4)), model_dir=tmp_path),
                               TrainSpec(vectors(32, 1), max_steps=6, batch_size=8,
                                         eval_every=2),
                               EvalSpec(vectors(20, 2), batch_size=5, exporters=[
                                   LatestExporter("exp-latest", keep=2),
                                   FinalExporter("exp-final")]))
    assert rerun["exported"] == []
    with pytest.raises(ValueError, match="distinct names"):
        EvalSpec(vectors(4, 1), exporters=[LatestExporter("x"), FinalExporter("x")])
    with pytest.raises(ValueError, match="keep"):
        LatestExporter("x", keep=0)
