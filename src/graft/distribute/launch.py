"""``graft launch``: start a training command on several processes and nodes, elastically.

This is torch.distributed's elastic launcher (``torchrun``) with Graft's defaults; nothing
here starts or watches processes itself. One agent runs per node; it starts
``--nproc-per-node`` workers with the environment ``DataParallel`` reads (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), checks on them every
``MONITOR_INTERVAL`` seconds and, when one exits with an error or dies, stops the others and
starts the whole group again (all nodes re-rendezvous), up to ``--max-restarts`` times. A
restarted script resumes from its Estimator's latest checkpoint.

The rendezvous is torch's ``c10d`` backend: a TCP store on ``127.0.0.1`` (a free port) for one
node, or at ``--rdzv-endpoint HOST:PORT`` (node 0's address) for several.

Commands after ``--``::

    graft launch --nproc-per-node 2 -- train.py --lr 0.1      # a Python script
    graft launch --nproc-per-node 2 -- graft finetune ...     # a graft subcommand
    graft launch --nproc-per-node 2 -- -m my_package.train    # a module, as python -m
    graft launch --nproc-per-node 2 -- ./run.sh               # any executable
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

from graft.errors import TrainingError

__all__ = [
    "MONITOR_INTERVAL",
    "SHUTDOWN_TIMEOUT",
    "launch",
    "run_from_args",
    "torchrun_args",
]

MONITOR_INTERVAL = 0.5
"""Seconds between the agent's checks of its workers: a dead worker is noticed this fast."""

SHUTDOWN_TIMEOUT = 10
"""Seconds the agent waits for workers to exit after SIGTERM before it sends SIGKILL."""

_PYTHONS = {"python", "python3", Path(sys.executable).name}


def run_from_args(args: argparse.Namespace) -> None:
    """Run ``graft launch`` from the options ``graft.cli`` parsed."""
    launch(args.training_command, nproc_per_node=args.nproc_per_node, nnodes=args.nnodes,
           node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
           max_restarts=args.max_restarts, collective_timeout=args.collective_timeout,
           local_addr=args.local_addr)


def launch(command: Sequence[str], *, nproc_per_node: int | str = 1, nnodes: int | str = 1,
           node_rank: int | None = None, rdzv_endpoint: str | None = None,
           rdzv_id: str | None = None, max_restarts: int = 0,
           collective_timeout: float | None = None, local_addr: str | None = None) -> None:
    """Run ``command`` on ``nproc_per_node`` workers here, as one node of ``nnodes``.

    Returns when every worker of the last attempt exited with status 0.

    Args:
        command: ``["train.py", *args]``, ``["graft", subcommand, *args]``,
            ``["-m", module, *args]`` or ``[executable, *args]`` (a leading ``"--"`` or
            ``"python"`` is dropped).
        nproc_per_node: Workers on this node, or ``"gpu"``: one per GPU.
        nnodes: Nodes, or ``"MIN:MAX"`` for an elastic job.
        node_rank: This node's index; node 0 hosts the rendezvous store. None: whichever
            node can bind ``rdzv_endpoint`` hosts it.
        rdzv_endpoint: ``HOST:PORT`` of the rendezvous store (node 0's address); needed
            for several nodes.
        rdzv_id: The job's id, the same on all nodes (default ``$SLURM_JOB_ID`` or
            ``"graft"``).
        max_restarts: How many times to restart the worker group after a failure.
        collective_timeout: Sets ``GRAFT_COLLECTIVE_TIMEOUT`` for the workers.
        local_addr: This node's address as the other nodes reach it.

    Raises:
        ValueError: an option is out of range or the command does not exist.
        TrainingError: a worker failed and no restart was left (its error is logged above).
        KeyboardInterrupt: the launcher was interrupted (workers are stopped).
    """
    argv = torchrun_args(command, nproc_per_node=nproc_per_node, nnodes=nnodes,
                         node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id,
                         max_restarts=max_restarts, local_addr=local_addr)
    # A fresh store for every attempt: with torch's default (the agent shares its rendezvous
    # store with the workers), keys that one attempt's process groups wrote are still there
    # when the next attempt reads them, and restarted workers dial addresses of the dead
    # ones (pytorch/pytorch#135712).
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE":
           os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")}
    if collective_timeout is not None:
        if isinstance(collective_timeout, bool) or not isinstance(collective_timeout,
                                                                  (int, float)) \
                or not 0 < collective_timeout < float("inf"):
            raise ValueError(f"--collective-timeout {collective_timeout!r}: expected a "
                             "positive number of seconds, e.g. 60")
        env["GRAFT_COLLECTIVE_TIMEOUT"] = repr(float(collective_timeout))

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    with _environment(env):
        try:
            torchrun.run(torchrun.parse_args(argv))
        except ChildFailedError as exc:
            raise TrainingError(_failure_message(exc, max_restarts)) from None
        except SignalException as exc:
            if exc.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None
            raise TrainingError(f"graft launch was stopped by {exc.sigval.name}; its "
                                "workers were stopped") from None


def torchrun_args(command: Sequence[str], *, nproc_per_node: int | str = 1,
                  nnodes: int | str = 1, node_rank: int | None = None,
                  rdzv_endpoint: str | None = None, rdzv_id: str | None = None,
                  max_restarts: int = 0, local_addr: str | None = None) -> list[str]:
    """The ``torchrun`` command line (without ``torchrun``) that :func:`launch` runs.

    Raises:
        ValueError: an option is out of range or the command does not exist.
    """
    nproc = _nproc(nproc_per_node)
    low, high = _nodes(nnodes)
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise ValueError(f"--max-restarts {max_restarts!r}: expected an int >= 0")
    if node_rank is not None:
        if isinstance(node_rank, bool) or not isinstance(node_rank, int) \
                or not 0 <= node_rank < high:
            raise ValueError(f"--node-rank {node_rank!r}: expected 0..{high - 1} for "
                             f"--nnodes {nnodes}")
    args = ["--nproc-per-node", str(nproc), "--nnodes", f"{low}:{high}",
            "--max-restarts", str(max_restarts), "--monitor-interval", str(MONITOR_INTERVAL),
            "--rdzv-backend", "c10d"]
    if _supports("--shutdown-timeout"):
        args += ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT)]
    if rdzv_endpoint is None:
        if high > 1:
            raise ValueError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT: node 0's "
                             "address and a free port there, the same on every node")
        # One node: a rendezvous store on a free loopback port, a fresh id per run.
        args += ["--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", rdzv_id or uuid.uuid4().hex,
                 "--local-addr", local_addr or "127.0.0.1"]
    else:
        host = _endpoint_host(rdzv_endpoint)
        args += ["--rdzv-endpoint", rdzv_endpoint,
                 "--rdzv-id", rdzv_id or os.environ.get("SLURM_JOB_ID") or "graft"]
        if node_rank is not None:
            args += ["--rdzv-conf", f"is_host={1 if node_rank == 0 else 0}"]
        if local_addr is None and host in ("127.0.0.1", "localhost", "::1"):
            local_addr = "127.0.0.1"
        if local_addr is not None:
            args += ["--local-addr", local_addr]
    return args + _entrypoint(command)


def _nproc(value: int | str) -> int | str:
    if isinstance(value, str) and value.strip() == "gpu":
        return "gpu"
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if isinstance(value, bool) or count < 1 or str(count) != str(value).strip():
        raise ValueError(f"--nproc-per-node {value!r}: expected a positive int (workers on "
                         "this node) or 'gpu' (one per GPU)")
    return count


def _nodes(value: int | str) -> tuple[int, int]:
    text = str(value).strip()
    parts = text.split(":")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        low = high = 0
    if isinstance(value, bool) or not 0 < low <= high:
        raise ValueError(f"--nnodes {value!r}: expected a positive int, or MIN:MAX with "
                         "0 < MIN <= MAX for an elastic job")
    return low, high


def _endpoint_host(endpoint: str) -> str:
    host, _, port = str(endpoint).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--rdzv-endpoint {endpoint!r}: expected HOST:PORT, e.g. "
                         "10.0.0.1:29400 (node 0's address and a free port)")
    return host.strip("[]")


def _entrypoint(command: Sequence[str]) -> list[str]:
    """torchrun's script arguments for a ``graft launch`` command."""
    words = list(command)
    if words[:1] == ["--"]:
        words = words[1:]
    if words and words[0] in _PYTHONS | {sys.executable}:
        words = words[1:]
    if not words:
        raise ValueError("graft launch needs a command after --, e.g. "
                         "`graft launch --nproc-per-node 2 -- train.py`")
    first, rest = words[0], words[1:]
    if first == "graft":
        return ["--module", "graft.cli", *rest]
    if first == "-m":
        if not rest:
            raise ValueError("graft launch -- -m needs a module name, e.g. -m my_pkg.train")
        return ["--module", *rest]
    if first.endswith(".py"):
        if not Path(first).is_file():
            raise ValueError(f"graft launch: no such script {first!r} (from {os.getcwd()})")
        return [first, *rest]
    if shutil.which(first) is None:
        raise ValueError(f"graft launch: {first!r} is neither a .py script nor an "
                         "executable on PATH")
    return ["--no-python", first, *rest]


def _supports(option: str) -> bool:
    from torch.distributed import run as torchrun

    return any(option in action.option_strings
               for action in torchrun.get_args_parser()._actions)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables (inherited by the workers) for the duration of a launch."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _failure_message(exc: Any, max_restarts: int) -> str:
    rank, failure = exc.get_first_failure()
    code = failure.exitcode
    how = f"exit status {code}"
    if code < 0:
        with contextlib.suppress(ValueError):
            how = f"signal {signal.Signals(-code).name}"
    tries = (f" after {max_restarts} restart{'s' if max_restarts != 1 else ''}"
             if max_restarts else " (no restarts: --max-restarts 0)")
    return (f"worker rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) ended "
            f"with {how}{tries}; its traceback is above")
