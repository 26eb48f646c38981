"""Estimator training-step time against a hand-written PyTorch loop, and compile vs eager.

Both sides train the same model on the same data with the same optimizer, batch size and
DataLoader (``num_workers=0``). A step's time is the time from one forward call to the next,
measured by the same thin wrapper around the model on both sides, so it covers everything a
step does: reading and collating the batch, forward, loss, backward, optimizer step, and
the framework's own bookkeeping (loss check, logging, progress, checkpoints). Runs of the
sides alternate, in reversed order every other round, so that drift on a busy machine hits
all alike; the table reports medians over all measured steps, and each ratio is the median
over rounds of the ratio of two runs made side by side, with its spread (the interquartile
range over rounds). The hand-written loop also runs twice per round: the ratio of its two
runs (an A/A comparison) is the noise floor, and a difference smaller than it is not
resolved (run more rounds).

The Estimator runs as a user would run it: with a ``model_dir`` (checkpoints every 100
steps, TensorBoard scalars every 10), progress bars off so the table stays readable.

    python bench/estimator.py            # full
    python bench/estimator.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from graft.train.estimator import Estimator  # noqa: E402

_Times = tuple[list[float], list[float]]  # per-step wall seconds, per-step CPU seconds


class _Clock(nn.Module):
    """Records the wall and process CPU time of every forward call of the wrapped model."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._stamp(x)
        return self.inner(x)

    @torch.compiler.disable
    def _stamp(self, x: torch.Tensor) -> None:
        # Kept out of compiled graphs (both compiled sides pay the same graph break).
        if x.is_cuda:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())


def _model(width: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, classes))


def _data(size: int, classes: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(size, 128, generator=g),
                         torch.randint(0, classes, (size,), generator=g))


def _step_times(clock: _Clock, warmup: int) -> _Times:
    """Per-step wall and CPU seconds, from one forward call to the next."""
    def diffs(stamps: list[float]) -> list[float]:
        stamps = stamps[warmup:]
        return [b - a for a, b in zip(stamps, stamps[1:])]

    return diffs(clock.stamps), diffs(clock.cpu_stamps)


def run_hand_loop(data: TensorDataset, model: nn.Module, steps: int, batch: int,
                  device: torch.device, warmup: int, compile: bool = False) -> _Times:
    """The loop a user writes by hand: shuffle, forward, loss, backward, step, loss.item()."""
    clock = _Clock(model).to(device)
    net = torch.compile(clock) if compile else clock
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True)
    done = 0
    net.train()
    while done < steps:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            loss.item()  # what every logging loop reads
            done += 1
            if done == steps:
                break
    # One more forward so the last step has an end stamp, as on the Estimator side.
    with torch.no_grad():
        clock(x)
    return _step_times(clock, warmup)


def run_estimator(data: TensorDataset, model: nn.Module, steps: int, batch: int,
                  device: torch.device, warmup: int, compile: bool = False,
                  loss: Callable | None = nn.functional.cross_entropy) -> _Times:
    from graft.distribute.strategy import OneDevice

    clock = _Clock(model)
    with tempfile.TemporaryDirectory() as model_dir:
        est = Estimator(clock, loss=loss, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
                        model_dir=model_dir, strategy=OneDevice(device), compile=compile,
                        progress=False)
        est.train(data, max_steps=steps, batch_size=batch)
        est.close()
    with torch.no_grad():
        clock(next(iter(DataLoader(data, batch_size=batch)))[0].to(device))
    return _step_times(clock, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, for a smoke run")
    parser.add_argument("--steps", type=int, default=None, help="steps per run")
    parser.add_argument("--rounds", type=int, default=None, help="alternating runs per side")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile rows")
    args = parser.parse_args()
    steps = args.steps or (60 if args.quick else 200)
    rounds = args.rounds or (2 if args.quick else 10)
    warmup = 10
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = _data(4096, 10)

    sides: dict[str, Callable[[], _Times]] = {
        "hand-written loop": lambda: run_hand_loop(data, _model(args.width, 10), steps,
                                                   args.batch, device, warmup),
        "hand-written loop (A/A)": lambda: run_hand_loop(data, _model(args.width, 10), steps,
                                                         args.batch, device, warmup),
        "Estimator": lambda: run_estimator(data, _model(args.width, 10), steps, args.batch,
                                           device, warmup),
        "Estimator, default loss": lambda: run_estimator(
            data, _model(args.width, 10), steps, args.batch, device, warmup, loss=None),
    }
    if not args.no_compile:
        sides["hand-written loop, compiled"] = lambda: run_hand_loop(
            data, _model(args.width, 10), steps, args.batch, device, warmup, compile=True)
        sides["Estimator compile=True"] = lambda: run_estimator(
            data, _model(args.width, 10), steps, args.batch, device, warmup, compile=True)
        for name in ("hand-written loop, compiled", "Estimator compile=True"):
            sides[name]()  # compile once outside the measurement

    # Rounds alternate the order of the sides (ABC, CBA, ...) so drift on a busy machine
    # cancels; each round's ratio compares runs that were adjacent in time.
    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    rounds_wall: dict[str, list[float]] = {name: [] for name in sides}
    rounds_cpu: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            w, c = sides[name]()
            wall[name] += w
            cpu[name] += c
            rounds_wall[name].append(statistics.median(w))
            rounds_cpu[name].append(statistics.median(c))

    def ratios(per_round: dict[str, list[float]], name: str, base: str) -> list[float]:
        return [a / b for a, b in zip(per_round[name], per_round[base])]

    def ratio(per_round: dict[str, list[float]], name: str, base: str) -> float:
        return statistics.median(ratios(per_round, name, base))

    def spread(per_round: dict[str, list[float]], name: str, base: str) -> str:
        values = ratios(per_round, name, base)
        if len(values) < 4:
            return "  (too few rounds for a spread)"
        q1, _, q3 = statistics.quantiles(values, n=4)
        return f"  IQR {q1:.3f}-{q3:.3f}"

    hand = "hand-written loop"
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} "
          f"width={args.width} steps/run={steps} rounds={rounds} torch={torch.__version__}")
    print(f"{'':28s} {'wall ms/step':>12s} {'p90':>7s} {'vs hand':>8s}   "
          f"{'CPU ms/step':>11s} {'vs hand':>8s}  spread of CPU ratio over rounds")
    for name in sides:
        print(f"{name:28s} {statistics.median(wall[name]) * 1e3:12.3f} "
              f"{statistics.quantiles(wall[name], n=10)[-1] * 1e3:7.3f} "
              f"{ratio(rounds_wall, name, hand):7.3f}x   "
              f"{statistics.median(cpu[name]) * 1e3:11.3f} {ratio(rounds_cpu, name, hand):7.3f}x"
              f"{spread(rounds_cpu, name, hand) if name != hand else ''}")
    est_cpu = ratio(rounds_cpu, "Estimator", hand)
    noise = [abs(r - 1) for r in ratios(rounds_cpu, "hand-written loop (A/A)", hand)]
    floor = statistics.median(noise)
    print(f"\nEstimator / hand loop (same loss; median of per-round ratios): wall "
          f"{ratio(rounds_wall, 'Estimator', hand):.3f}x, CPU time {est_cpu:.3f}x "
          f"(target <= 1.03x)")
    print(f"noise floor (median |A/A - 1| of the hand loop's CPU time): {floor:.3f}; the "
          f"difference {abs(est_cpu - 1):.3f} is "
          + ("resolved" if abs(est_cpu - 1) > floor else
             "within the noise: the Estimator's overhead is below what this run can see"))
    if not args.no_compile:
        print(f"Estimator compile=True / Estimator eager: wall "
              f"{ratio(rounds_wall, 'Estimator compile=True', 'Estimator'):.3f}x, CPU time "
              f"{ratio(rounds_cpu, 'Estimator compile=True', 'Estimator'):.3f}x")

if __name__ == "__main__":
    main()
