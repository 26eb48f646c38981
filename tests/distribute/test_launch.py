"""``graft launch``: torchrun underneath, elastic restarts from checkpoints, several nodes,
and failures that end or restart a job in seconds."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from graft.cli import main
from graft.distribute.launch import MONITOR_INTERVAL, torchrun_args
from graft.train.checkpoint import read_checkpoint
from tests.conftest import REPO
from tests.distribute.conftest import WORKER, finish, free_port, graft_launch, load_weights

SCRIPT = str(WORKER.relative_to(REPO))


def train_args(tmp: Path, *extra: str) -> list[str]:
    return ["--", SCRIPT, "train", str(tmp / "run"), str(tmp / "weights.safetensors"), *extra]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0.0, atol=0.0, msg=key)


def wait_for(path: Path, proc, timeout: float = 60) -> list[str]:
    """The words of ``path`` once a worker has written it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return path.read_text().split()
        if proc.poll() is not None:
            raise AssertionError(f"launcher exited early: {proc.communicate()[1][-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """Final weights of an uninterrupted 2-process run on one node."""
    tmp = tmp_path_factory.mktemp("one-node")
    out, err = finish(graft_launch("--nproc-per-node", "2", *train_args(tmp)))
    assert "done 40 world 2 restart 0" in out, err[-4000:]
    return load_weights(tmp / "weights.safetensors")


# -- end to end ------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_killed_worker_restarts_the_job_from_its_checkpoint_with_the_same_weights(
        tmp_path, one_node):
    proc = graft_launch("--nproc-per-node", "2", "--max-restarts", "1",
                        *train_args(tmp_path, "--pause-at", "25", "--pid-file",
                                    str(tmp_path / "pid")))
    pid = int(wait_for(tmp_path / "pid", proc)[0])  # rank 1, about to read batch 26
    os.kill(pid, signal.SIGKILL)
    out, err = finish(proc)
    assert proc.returncode == 0, err[-4000:]
    assert "done 40 world 2 restart 1" in out  # the second attempt finished
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert checkpoints == ["step-000000020", "step-000000030", "step-000000040"]
    # Each worker's own random stream (dropout) is saved, and was resumed.
    workers = read_checkpoint(tmp_path / "run" / "checkpoints" / checkpoints[0]).rng["workers"]
    assert len(workers) == 2 and not torch.equal(workers[0]["torch"], workers[1]["torch"])
    assert_same_weights(load_weights(tmp_path / "weights.safetensors"), one_node)


@pytest.mark.timeout(180)
def test_two_nodes_on_one_machine_train_like_one_node(tmp_path, one_node):
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [graft_launch("--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                          "--rdzv-endpoint", endpoint, *train_args(tmp_path))
             for rank in (0, 1)]
    outputs = [finish(node) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-4000:]
    assert sum("done 40 world 2 restart 0" in out for out, _ in outputs) == 1  # one chief
    assert_same_weights(load_weights(tmp_path / "weights.safetensors"), one_node)


@pytest.mark.timeout(120)
def test_a_crashed_worker_ends_the_job_within_seconds(tmp_path):
    # The collective timeout is 5 minutes here: the agent, not a timeout, ends the job.
    proc = graft_launch("--nproc-per-node", "2", "--collective-timeout", "300",
                        *train_args(tmp_path, "--crash-at", "3", "--pid-file",
                                    str(tmp_path / "pid")))
    crashed_at = float(wait_for(tmp_path / "pid", proc)[1])
    _, err = finish(proc, timeout=60)
    elapsed = time.time() - crashed_at
    assert proc.returncode == 1
    assert elapsed < 10, f"the job took {elapsed:.1f} s to end after a worker crashed"
    last = err.strip().splitlines()[-1]
    assert last.startswith("graft launch: error: worker rank") and "no restarts" in last


@pytest.mark.timeout(120)
def test_a_hung_worker_ends_the_job_within_the_collective_timeout(tmp_path):
    timeout = 3.0
    proc = graft_launch("--nproc-per-node", "2", "--collective-timeout", str(timeout),
                        *train_args(tmp_path, "--pause-at", "3", "--pid-file",
                                    str(tmp_path / "pid")))
    hung_at = float(wait_for(tmp_path / "pid", proc)[1])  # rank 1 sleeps, alive
    _, err = finish(proc, timeout=60)
    elapsed = time.time() - hung_at
    assert proc.returncode == 1
    assert "Timed out" in err
    assert timeout - 0.5 < elapsed < timeout + 10, f"ended {elapsed:.1f} s after the hang"


@pytest.mark.timeout(120)
def test_launch_runs_a_graft_subcommand_on_every_worker():
    out, err = finish(graft_launch("--nproc-per-node", "2", "--", "graft", "list"))
    assert out.count("the store is empty") == 2, err[-4000:]


# -- the torchrun command line ----------------------------------------------------------------


def test_one_node_rendezvous_is_on_a_free_loopback_port():
    script = str(WORKER)
    args = torchrun_args(["--", script, "--lr", "0.1"], nproc_per_node=4, max_restarts=2)
    option = dict(zip(args[:-3:2], args[1:-3:2]))
    assert option["--nproc-per-node"] == "4" and option["--nnodes"] == "1:1"
    assert option["--rdzv-backend"] == "c10d" and option["--rdzv-endpoint"] == "127.0.0.1:0"
    assert option["--local-addr"] == "127.0.0.1" and option["--max-restarts"] == "2"
    assert option["--monitor-interval"] == str(MONITOR_INTERVAL)
    assert args[-3:] == [script, "--lr", "0.1"]


def test_several_nodes_meet_at_the_endpoint_that_node_zero_hosts(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    common = {"nproc_per_node": 8, "nnodes": 4, "rdzv_endpoint": "10.1.2.3:29400"}
    first = torchrun_args(["-m", "pkg.train"], node_rank=0, **common)
    other = torchrun_args(["-m", "pkg.train"], node_rank=3, **common)
    assert first[first.index("--rdzv-endpoint") + 1] == "10.1.2.3:29400"
    assert first[first.index("--rdzv-id") + 1] == "4242"
    assert first[first.index("--rdzv-conf") + 1] == "is_host=1"
    assert other[other.index("--rdzv-conf") + 1] == "is_host=0"
    assert "--local-addr" not in first  # the host name, as other nodes reach it
    assert first[-2:] == ["--module", "pkg.train"]
    elastic = torchrun_args(["-m", "pkg.train"], nproc_per_node=8, nnodes="2:4",
                            rdzv_endpoint="head:29400")
    assert elastic[elastic.index("--nnodes") + 1] == "2:4"


@pytest.mark.parametrize("command, expected", [
    (["graft", "finetune", "--epochs", "3"], ["--module", "graft.cli", "finetune", "--epochs",
                                              "3"]),
    (["--", "graft", "list"], ["--module", "graft.cli", "list"]),
    (["-m", "pkg.train", "--x"], ["--module", "pkg.train", "--x"]),
    (["python", "-m", "pkg.train"], ["--module", "pkg.train"]),
    (["python3", SCRIPT, "a"], [SCRIPT, "a"]),
    (["true", "x"], ["--no-python", "true", "x"]),
])
def test_commands_become_torchrun_entrypoints(command, expected, monkeypatch):
    monkeypatch.chdir(REPO)
    args = torchrun_args(command)
    assert args[len(args) - len(expected):] == expected


@pytest.mark.parametrize("kwargs, match", [
    ({"nproc_per_node": 0}, "nproc-per-node"),
    ({"nproc_per_node": "many"}, "nproc-per-node"),
    ({"nnodes": "3:2"}, "nnodes"),
    ({"nnodes": 2}, "rdzv-endpoint"),
    ({"nnodes": 2, "rdzv_endpoint": "head"}, "HOST:PORT"),
    ({"nnodes": 2, "rdzv_endpoint": "head:99999"}, "HOST:PORT"),
    ({"nnodes": 2, "rdzv_endpoint": "head:29400", "node_rank": 2}, "node-rank"),
    ({"max_restarts": -1}, "max-restarts"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        torchrun_args([SCRIPT], **kwargs)


@pytest.mark.parametrize("command, match", [
    ([], "needs a command"), (["--"], "needs a command"), (["missing.py"], "no such script"),
    (["no-such-program-xyz"], "neither"), (["-m"], "module name"),
])
def test_bad_commands_are_refused(command, match):
    with pytest.raises(ValueError, match=match):
        torchrun_args(command)


@pytest.mark.parametrize("args, message", [
    (["--nproc-per-node", "0", "--", SCRIPT], "--nproc-per-node"),
    (["--collective-timeout", "-1", "--", SCRIPT], "--collective-timeout"),
    (["--", "missing.py"], "no such script"),
])
def test_cli_errors_are_one_line_and_start_nothing(args, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["launch", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("graft launch: error:") and err.count("\n") == 1 and message in err
    assert "GRAFT_COLLECTIVE_TIMEOUT" not in os.environ


def test_help_lists_the_launcher_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["launch", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for option in ("--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint",
                   "--max-restarts", "--collective-timeout"):
        assert option in out
