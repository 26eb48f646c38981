"""Training steps per second: one process against DataParallel, on the same global batch.

CPU (default): the same Estimator training (an MLP, global batch 256, SGD) as

- 1 process, 1 thread           (OneDevice('cpu'), torch.set_num_threads(1))
- 1 process, N threads          (OneDevice('cpu'), N = the machine's cores)
- N processes x 1 thread        (``graft launch --nproc-per-node N``: DataParallel, gloo)

GPU (``--gpu``, what ``bench/distributed_gpu.sh`` runs): one GPU as a single process
(OneDevice('cuda')) against DDP with a world of one (``graft launch --nproc-per-node 1``:
DataParallel, NCCL) -- the cost of the DDP wrapper, its gradient all-reduce and the
Estimator's per-step loss check on a single device.

Every configuration runs as its own process; a step's rate is measured inside the worker
(the chief) over the steps after a warm-up, so process start, rendezvous and imports are
not counted (the launcher's start-up time is reported apart). Configurations alternate over
rounds, and the table shows the median of the rounds.

    python bench/distributed.py                 # CPU, about a minute on 2 cores
    python bench/distributed.py --quick         # CPU, a few seconds of training
    python bench/distributed.py --gpu           # needs a CUDA GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


# -- the worker: one measured training run ---------------------------------------------------


def _worker(args: argparse.Namespace) -> None:
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from graft.distribute.strategy import OneDevice
    from graft.train.estimator import Estimator

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    size = args.batch * 8
    data = TensorDataset(torch.randn(size, args.features, generator=g),
                         torch.randint(0, 10, (size,), generator=g))
    torch.manual_seed(0)
    width = args.width
    model = nn.Sequential(nn.Linear(args.features, width), nn.ReLU(),
                          nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    strategy = OneDevice(args.device) if args.strategy == "one" else None  # None: launcher's
    est = Estimator(model, strategy=strategy, progress=False, tensorboard=False,
                    optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))

    def sync() -> None:
        if est.device.type == "cuda":
            torch.cuda.synchronize(est.device)

    est.train(data, max_steps=args.warmup, batch_size=args.batch)
    sync()
    start = time.perf_counter()
    est.train(data, max_steps=args.warmup + args.steps, batch_size=args.batch)
    sync()
    seconds = time.perf_counter() - start
    if est.strategy.is_chief:
        result = {"steps_per_sec": args.steps / seconds, "world_size": est.strategy.world_size,
                  "strategy": type(est.strategy).__name__, "device": str(est.device),
                  "backend": getattr(est.strategy, "backend", "-"), "threads": args.threads}
        Path(args.out).write_text(json.dumps(result))
    est.close()


# -- the driver --------------------------------------------------------------------------------


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(config: dict, common: list[str], tmp: Path) -> tuple[dict, float]:
    """Run one configuration; its worker's result and the wall time of the whole command."""
    out = tmp / f"{config['name'].replace(' ', '_')}-{time.monotonic_ns()}.json"
    worker = [str(Path(__file__).resolve()), "--worker", "--out", str(out),
              "--threads", str(config["threads"]), "--device", config["device"], *common]
    if config["procs"]:
        command = [sys.executable, "-m", "graft.cli", "launch", "--nproc-per-node",
                   str(config["procs"]), "--", *worker, "--strategy", "dp"]
    else:
        command = [sys.executable, *worker, "--strategy", "one"]
    env = _env(config["threads"])
    if config["device"] == "cpu" and config["procs"]:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # all workers on this machine
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{config['name']} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text()), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="1 GPU: single process vs DDP x1")
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    # worker options
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", choices=["one", "dp"], help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--features", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    cores = os.cpu_count() or 1
    if args.gpu:
        steps, warmup, width, rounds = 300, 30, 2048, args.rounds or 3
        configs = [{"name": "1 GPU, single process", "procs": 0, "threads": 4,
                    "device": "cuda"},
                   {"name": "1 GPU, DDP world 1 (NCCL)", "procs": 1, "threads": 4,
                    "device": "cuda"}]
    else:
        steps, warmup, width = (20, 3, 256) if args.quick else (120, 10, 512)
        rounds = args.rounds or (1 if args.quick else 3)
        configs = [{"name": "1 process x 1 thread", "procs": 0, "threads": 1, "device": "cpu"},
                   {"name": f"1 process x {cores} threads", "procs": 0, "threads": cores,
                    "device": "cpu"},
                   {"name": f"{cores} processes x 1 thread (DDP, gloo)", "procs": cores,
                    "threads": 1, "device": "cpu"}]
    common = ["--steps", str(args.steps or steps), "--warmup", str(args.warmup or warmup),
              "--batch", str(args.batch), "--width", str(args.width or width),
              "--features", str(args.features)]

    rates: dict[str, list[float]] = {c["name"]: [] for c in configs}
    walls: dict[str, list[float]] = {c["name"]: [] for c in configs}
    seen: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = configs if r % 2 == 0 else configs[::-1]
            for config in order:
                result, wall = _run(config, common, Path(tmp))
                rates[config["name"]].append(result["steps_per_sec"])
                walls[config["name"]].append(wall)
                seen[config["name"]] = result

    base = statistics.median(rates[configs[0]["name"]])
    print(f"\nglobal batch {args.batch}, MLP {args.features}-{args.width or width}-"
          f"{args.width or width}-10, {args.steps or steps} measured steps after "
          f"{args.warmup or warmup} warm-up, median of {rounds} round(s), "
          f"torch threads per process as listed; machine: {cores} CPU cores\n")
    header = f"{'configuration':42} {'steps/s':>9} {'vs first':>9} {'examples/s':>11} " \
             f"{'command wall s':>15}"
    print(header)
    print("-" * len(header))
    table = []
    for config in configs:
        name = config["name"]
        rate = statistics.median(rates[name])
        row = {"configuration": name, "steps_per_sec": rate, "relative": rate / base,
               "examples_per_sec": rate * args.batch, "wall_s": statistics.median(walls[name]),
               "rounds": rates[name], **{k: seen[name][k] for k in ("strategy", "backend",
                                                                     "world_size", "device")}}
        table.append(row)
        print(f"{name:42} {rate:9.1f} {rate / base:8.2f}x {rate * args.batch:11.0f} "
              f"{row['wall_s']:15.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
