"""The Estimator: exact resumption after SIGKILL and Ctrl-C, NaN handling, exact evaluation,
train_and_evaluate, TensorBoard events, export round trip, and bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import graft
from graft.distribute.strategy import OneDevice, Strategy, default_strategy
from graft.errors import DataError, ExtraNotInstalled, TrainingError
from graft.train.checkpoint import read_checkpoint
from graft.train.estimator import Estimator
from graft.train.interrupt import InterruptGuard
from graft.train.train_and_evaluate import train_and_evaluate
from graft.train.specs import EarlyStopping, EvalSpec, TrainSpec
from tests.conftest import REPO, TinyCNN, env_with_src

EXACT = {"rtol": 0.0, "atol": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")


def images(n: int = 120, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g),
                         torch.randint(0, 4, (n,), generator=g))


def vectors(n: int, seed: int, classes: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g),
                         torch.randint(0, classes, (n,), generator=g))


def mlp(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, classes))


def quiet(model: nn.Module, **kwargs) -> Estimator:
    kwargs.setdefault("progress", False)
    kwargs.setdefault("tensorboard", False)
    return Estimator(model, **kwargs)


def cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN()


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **EXACT, msg=key)


# -- exact resumption across processes --------------------------------------------------------

SCRIPT = textwrap.dedent("""
    import logging, signal, sys, time
    import torch
    from safetensors.torch import save_file
    from torch.utils.data import Dataset, TensorDataset
    from graft.train.estimator import Estimator
    from tests.conftest import TinyCNN

    torch.set_num_threads(1)
    model_dir, max_steps, out, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    # Ctrl-C as a terminal delivers it, even where the test runner was started with SIGINT
    # ignored (a background job), which this process would inherit and training respects
    signal.signal(signal.SIGINT, signal.default_int_handler)

    class Report(logging.Handler):
        def emit(self, record):
            if record.msg.startswith("checkpoint"):
                step = record.args[0]
                print(f"checkpoint {step}", flush=True)
                if mode == "hang" and step == 20:
                    time.sleep(600)  # the test SIGKILLs the process here
                if mode == "slow" and step == 10:
                    paused.append(step)  # the next example read waits for the test's Ctrl-C

    paused = []

    log = logging.getLogger("graft.train")
    log.setLevel(logging.INFO)
    log.addHandler(Report())

    class Slow(Dataset):  # after checkpoint 10, stops mid-training until the SIGINT arrives
        def __init__(self, inner): self.inner = inner
        def __len__(self): return len(self.inner)
        def __getitem__(self, i):
            if paused:
                time.sleep(600)  # a named point: the test's SIGINT interrupts it
            return self.inner[i]

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(120, 3, 8, 8, generator=g),
                         torch.randint(0, 4, (120,), generator=g))
    if mode == "slow":
        data = Slow(data)
    torch.manual_seed(0)
    est = Estimator(TinyCNN(), model_dir=model_dir, checkpoint_every=10, progress=False,
                    tensorboard=False)
    est.train(data, max_steps=max_steps, batch_size=16, seed=3)
    save_file({k: v.contiguous() for k, v in est.model.state_dict().items()}, out)
    print("done", est.step, flush=True)
""")


def _env() -> dict[str, str]:
    env = env_with_src()
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env["PYTHONPATH"]
    env["OMP_NUM_THREADS"] = "1"
    return env


def _start(tmp: Path, model_dir: Path, steps: int, out: Path, mode: str) -> subprocess.Popen:
    script = tmp / "train_script.py"
    if not script.exists():
        script.write_text(SCRIPT)
    return subprocess.Popen([sys.executable, str(script), str(model_dir), str(steps), str(out),
                             mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=REPO)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Weights after 40 steps in one process that was never stopped.

    The reference process starts at once and runs beside the test's own processes; the
    test asks for the weights (``uninterrupted()``) when it needs them.
    """
    tmp = tmp_path_factory.mktemp("reference")
    proc = _start(tmp, tmp / "run", 40, tmp / "weights.safetensors", "plain")
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def weights() -> dict[str, torch.Tensor]:
        if not cache:
            _finish(proc)
            cache["w"] = load_file(str(tmp / "weights.safetensors"))
        return cache["w"]

    yield weights
    proc.kill()
    proc.communicate()


def _wait_for(proc: subprocess.Popen, line: str) -> list[str]:
    seen = []
    for got in proc.stdout:
        seen.append(got.strip())
        if got.strip() == line:
            return seen
    raise AssertionError(f"never printed {line!r}; stdout {seen}, stderr "
                         f"{proc.stderr.read()[-3000:]}")


def test_resume_after_sigkill_gives_identical_weights(tmp_path, uninterrupted):
    model_dir = tmp_path / "run"
    proc = _start(tmp_path, model_dir, 40, tmp_path / "unused.safetensors", "hang")
    try:
        assert _wait_for(proc, "checkpoint 20") == ["checkpoint 10", "checkpoint 20"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert read_checkpoint(model_dir / "checkpoints" / "step-000000020").step == 20

    out = _finish(_start(tmp_path, model_dir, 40, tmp_path / "resumed.safetensors", "plain"))
    assert out.split() == ["checkpoint", "30", "checkpoint", "40", "done", "40"]
    assert_same_weights(load_file(str(tmp_path / "resumed.safetensors")), uninterrupted())


def test_ctrl_c_saves_the_last_completed_step_then_resume_is_exact(tmp_path, uninterrupted):
    model_dir = tmp_path / "run"
    proc = _start(tmp_path, model_dir, 40, tmp_path / "unused.safetensors", "slow")
    try:
        _wait_for(proc, "checkpoint 10")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "KeyboardInterrupt" in err, err[-3000:]
    assert "done" not in out
    latest = read_checkpoint(model_dir / "checkpoints" / (model_dir / "checkpoints" /
                                                          "latest").read_text().strip())
    assert 10 <= latest.step < 40
    assert (latest.step == 10) or f"checkpoint {latest.step}" in out

    # Resumed here, in the test's process: the same weights as the reference process.
    resumed = quiet(cnn(), model_dir=model_dir, checkpoint_every=10)
    resumed.train(images(), max_steps=40, batch_size=16, seed=3)
    assert_same_weights(resumed.model.state_dict(), uninterrupted())


class _InterruptAt(Dataset):
    """Raises KeyboardInterrupt on the n-th item read, as a Ctrl-C would."""

    def __init__(self, inner: Dataset, at: int) -> None:
        self.inner, self.at, self.reads = inner, at, 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        self.reads += 1
        if self.reads == self.at:
            raise KeyboardInterrupt
        return self.inner[i]


def test_interrupt_in_process_checkpoints_and_continues_exactly(tmp_path):
    def halving(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)

    reference = quiet(cnn(), scheduler=halving).train(images(), max_steps=16, batch_size=16,
                                                       seed=1)
    est = quiet(cnn(), scheduler=halving, model_dir=tmp_path, checkpoint_every=100)
    # Item 1 is read by the first-item check; then 16 per step: read 16*11 + 5 + 1 fails
    # inside step 12's batch, after 11 completed steps.
    data = _InterruptAt(images(), at=1 + 16 * 11 + 5)
    with pytest.raises(KeyboardInterrupt):
        est.train(data, max_steps=16, batch_size=16, seed=1)
    assert est.latest_checkpoint().name == "step-000000011"
    resumed = quiet(cnn(), scheduler=halving, model_dir=tmp_path)
    resumed.train(images(), max_steps=16, batch_size=16, seed=1)
    assert resumed.optimizer.param_groups[0]["lr"] == reference.optimizer.param_groups[0]["lr"]
    assert_same_weights(resumed.model.state_dict(), reference.model.state_dict())


@pytest.fixture
def sigint(request):
    """SIGINT set to ``request.param`` (default: Python's KeyboardInterrupt) for one test,
    whatever the runner inherited (a background job starts with it ignored)."""
    previous = signal.signal(signal.SIGINT, getattr(request, "param",
                                                    signal.default_int_handler))
    yield
    signal.signal(signal.SIGINT, previous)


def test_interrupt_guard_defers_ctrl_c_in_critical_sections(sigint):
    done = []
    with InterruptGuard() as guard:
        with pytest.raises(KeyboardInterrupt):
            with guard.critical():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("update finished")
        assert done == ["update finished"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("sigint", [signal.SIG_IGN], indirect=True)
def test_interrupt_guard_keeps_an_ignored_ctrl_c_ignored(sigint):
    done = []
    with InterruptGuard() as guard:  # training started with nohup, or as a background job
        with guard.critical():
            os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        done.append("still training")
    assert done == ["still training"]
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_train_calls_in_pieces_equal_one_call():
    whole = quiet(cnn()).train(images(), max_steps=25, batch_size=16, seed=2)
    pieces = quiet(cnn())
    for stop in (7, 8, 25):
        pieces.train(images(), max_steps=stop, batch_size=16, seed=2)
    assert pieces.step == 25
    assert_same_weights(pieces.model.state_dict(), whole.model.state_dict())


def test_loader_workers_read_the_same_batches():
    in_process = quiet(cnn()).train(images(), max_steps=10, batch_size=16, seed=4)
    workers = quiet(cnn(), num_workers=2).train(images(), max_steps=10, batch_size=16, seed=4)
    assert_same_weights(workers.model.state_dict(), in_process.model.state_dict())


def test_input_fn_is_called_for_the_dataset():
    est = quiet(mlp())
    est.train(lambda: vectors(32, 0), max_steps=2, batch_size=8)
    assert est.step == 2
    assert est.evaluate(lambda: vectors(10, 1))["examples"] == 10


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return self.a(left) + self.b(right)


def test_collate_fn_and_dict_inputs():
    g = torch.Generator().manual_seed(0)
    items = [((torch.randn(3, generator=g), torch.randn(2, generator=g)), i % 4)
             for i in range(30)]  # a plain list is a map-style dataset

    def collate(batch):
        return ({"left": torch.stack([x[0][0] for x in batch]),
                 "right": torch.stack([x[0][1] for x in batch])},
                torch.tensor([x[1] for x in batch]))

    est = quiet(_TwoInputs(), collate_fn=collate)
    est.train(items, max_steps=4, batch_size=8)
    assert est.evaluate(items, batch_size=8)["examples"] == 30
    left = torch.stack([x[0][0] for x in items])
    right = torch.stack([x[0][1] for x in items])
    got = est.predict({"left": left, "right": right}, batch_size=7)
    torch.testing.assert_close(got, est.model(left=left, right=right).detach())
    torch.testing.assert_close(est.predict(items, batch_size=7), got, **EXACT)


# -- NaN --------------------------------------------------------------------------------------


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def loss(logits, labels):
        calls["n"] += 1
        value = nn.functional.cross_entropy(logits, labels)
        return value * float("nan") if calls["n"] == 13 else value

    est = quiet(mlp(), loss=loss, model_dir=tmp_path, checkpoint_every=5)
    with pytest.raises(TrainingError, match=r"step 13") as info:
        est.train(vectors(64, 0), max_steps=30, batch_size=8)
    assert "step 10" in str(info.value) and "kept" in str(info.value)
    assert est.step == 12
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-000000005", "step-000000010"]
    for p in est.model.parameters():
        assert torch.isfinite(p).all()
    restored = quiet(mlp(), model_dir=tmp_path)
    assert restored.restore() == 10
    saved = read_checkpoint(tmp_path / "checkpoints" / "step-000000010").model
    assert_same_weights(restored.model.state_dict(), saved)
    assert np.isfinite(restored.evaluate(vectors(20, 1))["loss"])


# -- evaluate / predict -----------------------------------------------------------------------


def _np_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    order = np.argsort(-logits, axis=-1)
    confusion = np.zeros((logits.shape[1],) * 2, dtype=np.int64)
    np.add.at(confusion, (labels, logits.argmax(-1)), 1)
    return {"loss": -logp[np.arange(len(labels)), labels].mean(),
            "accuracy": (logits.argmax(-1) == labels).mean(),
            "top2": (order[:, :2] == labels[:, None]).any(-1).mean(),
            "confusion_matrix": confusion}


def test_evaluate_matches_numpy_with_a_short_last_batch():
    model = mlp(5)
    data = vectors(103, 4, classes=5)  # 103 = 10 batches of 10 and one of 3
    est = quiet(model, metrics=("accuracy", "top2", "top7", "confusion_matrix"), progress=True)
    result = est.evaluate(data, batch_size=10)
    x, y = data.tensors
    with torch.no_grad():
        logits = model.double()(x.double()).numpy()
    model.float()
    ref = _np_metrics(logits, y.numpy())
    assert result["examples"] == 103 and result["step"] == 0
    assert result["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert result["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert result["top2"] == pytest.approx(ref["top2"], abs=1e-12)
    assert result["top7"] == 1.0
    np.testing.assert_array_equal(result["confusion_matrix"].numpy(), ref["confusion_matrix"])
    assert int(result["confusion_matrix"].sum()) == 103


class _HalfOf(Strategy):
    """Rank ``rank`` of two workers, in one process: the other worker's counts are given."""

    def __init__(self, rank: int, other: torch.Tensor | None = None) -> None:
        self._rank, self.other, self.seen = rank, other, None

    device = torch.device("cpu")
    world_size = 2

    @property
    def rank(self) -> int:
        return self._rank

    def wrap_model(self, model):
        return model

    def all_reduce_sum(self, tensor):
        self.seen = tensor.clone()
        return tensor if self.other is None else tensor + self.other

    def barrier(self):
        pass


def test_evaluate_over_two_workers_counts_each_example_once():
    data = vectors(41, 5)
    whole = quiet(mlp()).evaluate(data, batch_size=6)
    second = _HalfOf(1)
    quiet(mlp(), strategy=second).evaluate(data, batch_size=6)
    first = quiet(mlp(), strategy=_HalfOf(0, other=second.seen)).evaluate(data, batch_size=6)
    assert first["examples"] == 41
    assert first["accuracy"] == whole["accuracy"]
    assert first["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def test_strategy_shards_partition_and_batches_are_global():
    order = torch.randperm(23).tolist()
    for world in (1, 2, 3, 4):
        shares = [_Ranked(r, world).shard(order) for r in range(world)]
        assert sorted(sum(shares, [])) == list(range(23))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert _Ranked(0, 4).per_worker_batch(32) == 8
    with pytest.raises(ValueError, match="multiple of 4"):
        _Ranked(0, 4).per_worker_batch(30)
    assert isinstance(default_strategy(), OneDevice)
    assert OneDevice().is_chief and OneDevice().world_size == 1


class _Ranked(_HalfOf):
    def __init__(self, rank: int, world: int) -> None:
        super().__init__(rank)
        self.world_size = world


def test_predict_returns_logits_in_order():
    model = mlp()
    est = quiet(model)
    data = vectors(37, 6)
    x = data.tensors[0]
    from_tensor = est.predict(x, batch_size=8)
    from_dataset = est.predict(data, batch_size=8)
    torch.testing.assert_close(from_tensor, model(x).detach())
    torch.testing.assert_close(from_dataset, from_tensor, **EXACT)
    assert from_tensor.shape == (37, 4)


# -- train_and_evaluate -----------------------------------------------------------------------


def test_train_and_evaluate_stops_early_and_keeps_best(tmp_path):
    # Random labels: the training set is memorised and the held-out loss rises.
    est = Estimator(mlp(), optimizer=lambda p: torch.optim.Adam(p, lr=0.03), model_dir=tmp_path,
                    progress=False, checkpoint_every=1000, keep_checkpoints=1)
    result = train_and_evaluate(
        est,
        TrainSpec(vectors(64, 7), max_steps=400, batch_size=16, eval_every=10, seed=0),
        EvalSpec(vectors(50, 8), batch_size=16,
                 early_stopping=EarlyStopping("loss", patience=2, mode="min")),
    )
    assert result["stopped_early"] is True
    best_step = result["best_step"]
    assert est.step == result["step"] == best_step + 20 < 400
    best = json.loads((tmp_path / "best" / "metrics.json").read_text())
    assert best["step"] == best_step and best["loss"] < result["loss"]
    # Only the newest checkpoint survives pruning; best is its own copy.
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == \
        [f"step-{est.step:09d}"]
    again = quiet(mlp(), model_dir=tmp_path)
    assert again.restore("best") == best_step
    assert again.evaluate(vectors(50, 8), batch_size=16)["loss"] == best["loss"]
    # Re-running after an early stop trains no further.
    rerun = train_and_evaluate(quiet(mlp(), model_dir=tmp_path),
                               TrainSpec(vectors(64, 7), max_steps=400, eval_every=10),
                               EvalSpec(vectors(50, 8), early_stopping=EarlyStopping()))
    assert rerun["step"] == est.step and rerun["stopped_early"] is True


def test_tensorboard_events_hold_train_and_eval_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    est = Estimator(mlp(), model_dir=tmp_path, progress=False, log_every=5,
                    metrics=("accuracy", "top2"))
    train_and_evaluate(est, TrainSpec(vectors(64, 0), max_steps=20, batch_size=16,
                                      eval_every=10),
                       EvalSpec(vectors(30, 1), batch_size=16, keep_best=False))
    est.close()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/steps_per_sec", "eval/loss", "eval/accuracy",
            "eval/top2"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20]
    assert [e.step for e in events.Scalars("eval/accuracy")] == [10, 20]
    assert events.Scalars("train/lr")[0].value == pytest.approx(1e-3)
    assert not (tmp_path / "best").exists()


def test_missing_tensorboard_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ExtraNotInstalled, match=r"graft-hub\[train\]"):
        Estimator(mlp(), model_dir=tmp_path)
    assert not tmp_path.joinpath("checkpoints").exists()
    Estimator(mlp(), model_dir=tmp_path, tensorboard=False)  # still usable without


# -- export -----------------------------------------------------------------------------------


def test_export_round_trip_with_hub_parent(tmp_path):
    example = torch.randn(2, 3, 8, 8)
    graft.save(cnn(), tmp_path / "backbone", name="tiny-backbone", version="1.0.0",
               signatures={"features": graft.Signature("features", example_inputs=(example,))})
    backbone = graft.load(tmp_path / "backbone", trainable=True)
    torch.manual_seed(1)
    model = nn.Sequential(backbone.signature("features"), nn.Linear(8, 4))
    est = quiet(model)
    est.train(images(48), max_steps=3, batch_size=16)
    saved = est.export(tmp_path / "exported", name="tiny-classifier", version="1.0.0")
    loaded = graft.load(saved.path)
    x = images(10, seed=9).tensors[0]
    torch.testing.assert_close(loaded(x), est.predict(x), rtol=1e-5, atol=1e-6)
    assert [p.digest for p in loaded.manifest.parents] == [backbone.digest]
    assert model.training  # export's eval mode was undone


# -- compile ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised by torch's own imports
def test_compiled_training_matches_eager():
    data = vectors(160, 3)
    eager = quiet(mlp(), log_every=1).train(data, max_steps=20, batch_size=16)
    compiled = quiet(mlp(), log_every=1, compile=True).train(data, max_steps=20, batch_size=16)
    a = [h["loss"] for h in eager.history]
    b = [h["loss"] for h in compiled.history]
    assert len(a) == len(b) == 20
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


# -- bad inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, None])
def test_bad_max_steps_writes_nothing(tmp_path, steps):
    est = Estimator(mlp(), model_dir=tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="max_steps"):
        est.train(vectors(32, 0), max_steps=steps)
    assert not (tmp_path / "run").exists()


def test_bad_data_is_refused_before_anything_is_written(tmp_path):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    est = Estimator(model, model_dir=tmp_path / "run", progress=False)
    with pytest.raises(DataError, match="empty"):
        est.train(vectors(0, 0), max_steps=5)
    with pytest.raises(DataError, match="fewer than one batch"):
        est.train(vectors(10, 0), max_steps=5, batch_size=32)
    with pytest.raises(DataError, match=r"\(inputs, label\) pair"):
        est.train(TensorDataset(torch.randn(40, 6)), max_steps=5)
    with pytest.raises(DataError, match="map-style dataset"):
        est.train(torch.randn(40, 6), max_steps=5)
    x = torch.randn(40, 6)
    with pytest.raises(DataError, match=r"step 1: .*class 7, outside \[0, 4\)"):
        est.train(TensorDataset(x, torch.full((40,), 7)), max_steps=5, batch_size=8)
    with pytest.raises(DataError, match="class 4"):
        est.evaluate(TensorDataset(x, torch.full((40,), 4)))
    assert not (tmp_path / "run").exists()
    assert_same_weights(model.state_dict(), before)
    assert est.step == 0


def test_bad_constructor_and_spec_arguments(tmp_path):
    for kwargs, match in [({"metrics": ("f1",)}, "unknown metric"),
                          ({"checkpoint_every": 0}, "checkpoint_every"),
                          ({"num_workers": -1}, "num_workers"),
                          ({"optimizer": "adam"}, "factory"),
                          ({"compile": 1}, "compile")]:
        with pytest.raises(ValueError, match=match):
            Estimator(mlp(), progress=False, **kwargs)
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Estimator(frozen)
    with pytest.raises(ValueError, match="TrainSpec: max_steps must be a positive int; got int 0"):
        TrainSpec(vectors(8, 0), max_steps=0)
    with pytest.raises(ValueError, match="data must be a map-style dataset"):
        TrainSpec(100, 5)
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        EarlyStopping("loss", mode="lowest")
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping("loss", patience=0)
    with pytest.raises(ValueError, match="EvalSpec: batch_size"):
        EvalSpec(vectors(8, 0), batch_size=0)
    assert EvalSpec(vectors(8, 0), best_metric="accuracy").best.mode == "max"
    spec = TrainSpec(vectors(8, 0), max_steps=10, eval_every=5)
    assert TrainSpec.from_json(spec.to_json(), spec.data) == spec
    with pytest.raises(ValueError, match="best_metric='f1' is not an evaluation metric"):
        train_and_evaluate(quiet(mlp()), TrainSpec(vectors(16, 0), max_steps=1, batch_size=8),
                           EvalSpec(vectors(8, 0), best_metric="f1"))
