"""Helpers for the distributed tests: real worker processes on 127.0.0.1, gloo, CPU."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, env_with_src

WORKER = REPO / "tests" / "distribute" / "worker.py"


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a worker or launcher: the source tree and tests importable, one
    thread each, gloo on the loopback interface only."""
    env = env_with_src()
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env["PYTHONPATH"]
    env["OMP_NUM_THREADS"] = "1"
    env["GLOO_SOCKET_IFNAME"] = "lo"
    env["PYTHONWARNINGS"] = "ignore::FutureWarning"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RESTART_COUNT", "GRAFT_COLLECTIVE_TIMEOUT"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_workers(world: int, args: list[str], timeout: float = 90) -> None:
    """Start ``world`` worker processes the way a launcher would (RANK, WORLD_SIZE,
    MASTER_ADDR=127.0.0.1, a free MASTER_PORT) and wait for all of them to succeed."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = worker_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                         LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *args], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    failed = [(rank, p.returncode) for rank, p in enumerate(procs) if p.returncode != 0]
    assert not failed, f"workers failed {failed}:\n" + "\n".join(o[-3000:] for o in outputs)


def graft_launch(*args: str, **env: str) -> subprocess.Popen:
    """``graft launch ARGS`` in a new process (its output captured)."""
    # Its own session, so that a test that gives up can kill it and its workers together.
    return subprocess.Popen([sys.executable, "-m", "graft.cli", "launch", *args],
                            env=worker_env(**env), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    """Wait for a :func:`graft_launch` process; kill its process group (and fail) if it
    outlives ``timeout``."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s:\n{out[-2000:]}\n{err[-4000:]}")


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))
