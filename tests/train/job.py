"""A training job written as a user writes one; the tests run it in real processes.

    python tests/train/job.py features MODEL_DIR OUT   (plain, or under graft launch)
        train_and_evaluate on a *stream* with custom metrics (torchmetrics F1 and AUROC, a
        function) and Best/Latest/Final exporters; every worker logs the ids of the
        training examples it consumed; rank 0 writes the result and the final weights.
    python tests/train/job.py resume MODEL_DIR OUT
        12 steps on a stream with dropout, checkpoints every 3; rank 0 saves the weights
        (the tests kill it with GRAFT_TEST_STOP_AT=train.step#7 and resume).
    python tests/train/job.py sidecar MODEL_DIR OUT
        train_and_evaluate(evaluator="sidecar"); each checkpoint's weights are copied to OUT
        by an on_checkpoint hook. Under `graft evaluate --watch MODEL_DIR` the same call is
        the sidecar, and its result goes to OUT/sidecar.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset, default_collate

torch.set_num_threads(1)

TRAIN_SIZE, EVAL_SIZE, FEATURES, CLASSES = 37, 101, 6, 4


def tensors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, FEATURES, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


class Records(IterableDataset):
    """A stream of (features + id, label) records with no length, read in a fixed order."""

    def __init__(self) -> None:
        self.x, self.y = tensors(TRAIN_SIZE, 1)

    def __iter__(self):
        for i in range(TRAIN_SIZE):
            yield torch.cat([self.x[i], torch.tensor([float(i)])]), self.y[i]


def eval_set() -> TensorDataset:
    x, y = tensors(EVAL_SIZE, 2)
    ids = torch.arange(1000, 1000 + EVAL_SIZE, dtype=torch.float32)[:, None]
    return TensorDataset(torch.cat([x, ids], 1), y)


class DropId(nn.Module):
    """The last feature is the record id: logged by the collate function, not learnt from."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :FEATURES]


def model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(DropId(), nn.Linear(FEATURES, 16), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(16, CLASSES))


SEEN: list[list[int]] = []


def logging_collate(items):
    batch = default_collate(items)
    ids = batch[0][:, FEATURES].long().tolist()
    if ids and ids[0] < 1000:  # training records only
        SEEN.append(ids)
    return batch


def brier(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    one_hot = torch.nn.functional.one_hot(labels, CLASSES).to(logits.dtype)
    return (logits.softmax(-1) - one_hot).square().sum(-1)  # (B,)


def save_weights(net: nn.Module, path: Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path))


def features(model_dir: Path, out: Path) -> None:
    from torchmetrics.classification import MulticlassAUROC, MulticlassF1Score

    import graft
    from graft.train import BestExporter, FinalExporter, LatestExporter

    net = model()
    est = graft.Estimator(net, model_dir=model_dir, progress=False, tensorboard=False,
                          collate_fn=logging_collate, checkpoint_every=4,
                          metrics={"accuracy": "accuracy",
                                   "f1": MulticlassF1Score(CLASSES, average="macro"),
                                   "auroc": MulticlassAUROC(CLASSES), "brier": brier})
    exporters = [BestExporter("job-best", metric="f1", keep=2),
                 LatestExporter("job-latest", keep=2), FinalExporter("job-final")]
    result = graft.train_and_evaluate(
        est, graft.TrainSpec(Records(), max_steps=12, batch_size=8, eval_every=4),
        graft.EvalSpec(eval_set(), batch_size=10, exporters=exporters))
    rank = est.strategy.rank
    (out / f"seen-{rank}.json").write_text(json.dumps(SEEN))
    (out / f"exported-{rank}.json").write_text(json.dumps(result["exported"]))
    if est.strategy.is_chief:
        save_weights(net, out / "final.safetensors")
        metrics = {k: v for k, v in result.items() if k != "exported"}
        (out / "result.json").write_text(json.dumps(metrics))
    est.close()


def resume(model_dir: Path, out: Path) -> None:
    import graft

    net = model(dropout=0.3)
    est = graft.Estimator(net, model_dir=model_dir, progress=False, tensorboard=False,
                          checkpoint_every=3)
    start = est.latest_checkpoint()
    est.train(Records(), max_steps=12, batch_size=8)
    (out / f"started-from-{est.strategy.rank}.txt").write_text(start.name if start else "")
    if est.strategy.is_chief:
        save_weights(net, out / "weights.safetensors")
    est.close()


def sidecar(model_dir: Path, out: Path) -> None:
    import graft
    from graft.train import Callback, FinalExporter

    class CopyWeights(Callback):
        def on_checkpoint(self, estimator, path):
            if estimator.strategy.is_chief and not os.environ.get("GRAFT_EVALUATE_WATCH"):
                save_weights(estimator.model, out / f"weights-{estimator.step}.safetensors")

    net = model()
    est = graft.Estimator(net, model_dir=model_dir, progress=False, tensorboard=False,
                          keep_checkpoints=1, callbacks=[CopyWeights()])
    result = graft.train_and_evaluate(
        est, graft.TrainSpec(Records(), max_steps=10, batch_size=8, eval_every=2),
        graft.EvalSpec(eval_set(), batch_size=10, exporters=[FinalExporter("side-final")]),
        evaluator="sidecar")
    if "evaluated" in result:
        (out / "sidecar.json").write_text(json.dumps(result))
    est.close()


if __name__ == "__main__":
    scenario, model_dir, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    {"features": features, "resume": resume, "sidecar": sidecar}[scenario](model_dir, out)
