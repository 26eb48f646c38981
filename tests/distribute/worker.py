"""The training script the distributed tests run in real worker processes.

It is written the way a user writes one: an Estimator with no strategy (the environment
implies ``DataParallel``) or an explicit ``DataParallel``; no process groups, samplers or
backends. The tests compute their single-process references with the same builders.

    python tests/distribute/worker.py suite OUT_DIR
        (under RANK/WORLD_SIZE/MASTER_*): equivalence, batch-norm, evaluation and uneven-shard
        scenarios for this world size; rank 0 writes the results to OUT_DIR
    python tests/distribute/worker.py train MODEL_DIR OUT [--pause-at S --pause-file F]
                                                          [--crash-at S] [--rank R]
        (under graft launch): 40 steps of a model with dropout, checkpoints every 10;
        rank 0 saves the weights
        to OUT. On the first attempt, rank R writes its pid to F and sleeps before step S+1
        (--pause-at) or exits with status 7 there (--crash-at).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset, TensorDataset

torch.set_num_threads(1)

EVAL_SIZE = 101
STEPS = 20


def vectors(n: int, seed: int, classes: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g),
                         torch.randint(0, classes, (n,), generator=g))


def images(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 6, 6, generator=g),
                         torch.randint(0, 4, (n,), generator=g))


def mlp(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, classes))


def dropout_mlp() -> nn.Module:
    """With dropout: a resumed run matches only if every worker resumes its own RNG."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4))


class BatchNormNet(nn.Module):
    """Conv, batch norm, pooling, linear: no dropout, so runs are deterministic."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))  # (B, 8, H, W)
        return self.head(x.mean(dim=(2, 3)))  # (B, 4)


def bn_net() -> BatchNormNet:
    torch.manual_seed(0)
    return BatchNormNet()


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def estimator(model: nn.Module, **kwargs):
    from graft.train.estimator import Estimator

    return Estimator(model, optimizer=sgd, progress=False, tensorboard=False, **kwargs)


def save_weights(model: nn.Module, path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(path))


def jsonable(metrics: dict) -> dict:
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}


# -- suite -------------------------------------------------------------------------------------


def suite(out: Path) -> None:
    from graft.distribute.batch_norm import SyncBatchNorm
    from graft.distribute.data_parallel import DataParallel

    world = int(os.environ["WORLD_SIZE"])
    chief = int(os.environ["RANK"]) == 0
    results: dict = {}

    # The environment implies the strategy: the user's code names none.
    est = estimator(mlp(classes=5))
    results["strategy"] = type(est.strategy).__name__
    results["backend"] = est.strategy.backend
    results["world_size"] = est.strategy.world_size
    metrics = est.evaluate(vectors(EVAL_SIZE, 7, classes=5), batch_size=10)
    results["evaluate"] = jsonable(metrics)
    # Batch 7 on 3 workers: 3 per worker, so shards of 34, 34, 33 take 12, 12 and 11
    # batches; only the final sum is a collective, so unequal batch counts cannot hang.
    metrics = est.evaluate(vectors(EVAL_SIZE, 7, classes=5), batch_size=7)
    results["evaluate_batch_7"] = jsonable(metrics)

    if world == 2:
        est = estimator(mlp())
        est.train(vectors(64, 1), max_steps=STEPS, batch_size=16, seed=5)
        if chief:
            save_weights(est.model, out / "plain.safetensors")

        model = bn_net()
        est = estimator(model, strategy=DataParallel(sync_batch_norm=True))
        results["sync_layers"] = sum(isinstance(m, SyncBatchNorm) for m in model.modules())
        est.train(images(64, 2), max_steps=STEPS, batch_size=16, seed=5)
        if chief:
            save_weights(est.model, out / "syncbn.safetensors")
        # The chief exports alone while the others wait: batch norm must not synchronise.
        saved = est.export(out / "module", name="bn-net", version="1.0.0")
        results["exported"] = saved is not None

    if world == 3:
        # 10 examples over 3 workers: shards of 4, 3 and 3.
        est = estimator(mlp())
        est.train(vectors(10, 3), max_steps=7, batch_size=3, seed=5)
        results["uneven_steps"] = est.step
        results["uneven_evaluate"] = jsonable(est.evaluate(vectors(10, 3), batch_size=4))
        if chief:
            save_weights(est.model, out / "uneven.safetensors")

    if chief:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    est.strategy.barrier()


# -- train (under graft launch) ----------------------------------------------------------------


class _Interrupting(Dataset):
    """Pauses or crashes this worker when it starts reading batch ``at + 1``."""

    def __init__(self, inner: Dataset, per_worker: int, at: int, action, pid_file) -> None:
        self.inner, self.action, self.pid_file = inner, action, pid_file
        self.limit = at * per_worker
        self.reads = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        if self.reads == self.limit:
            if self.pid_file:
                Path(self.pid_file).write_text(f"{os.getpid()} {time.time()}")
            if self.action == "crash":
                os._exit(7)
            time.sleep(600)  # the test kills this process, or the collective timeout fires
        self.reads += 1
        return self.inner[i]


def train(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--pause-at", type=int)
    parser.add_argument("--crash-at", type=int)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--pid-file")
    args = parser.parse_args(argv)

    data = vectors(96, 4)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and int(os.environ["RANK"]) == args.rank:
        if args.pause_at is not None:
            data = _Interrupting(data, 4, args.pause_at, "pause", args.pid_file)
        elif args.crash_at is not None:
            data = _Interrupting(data, 4, args.crash_at, "crash", args.pid_file)
    est = estimator(dropout_mlp(), model_dir=args.model_dir, checkpoint_every=10)
    est.train(data, max_steps=40, batch_size=8, seed=3)
    if est.strategy.is_chief:
        save_weights(est.model, Path(args.out))
        print(f"done {est.step} world {est.strategy.world_size} "
              f"restart {os.environ.get('TORCHELASTIC_RESTART_COUNT')}", flush=True)
    est.close()


if __name__ == "__main__":
    if sys.argv[1] == "suite":
        suite(Path(sys.argv[2]))
    elif sys.argv[1] == "train":
        train(sys.argv[2:])
    else:
        raise SystemExit(f"unknown scenario {sys.argv[1]!r}")
