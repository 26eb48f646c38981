"""Streams, custom metrics, exporters, resumption and the sidecar in real processes.

Each job is ``tests/train/job.py`` started the way a user starts one: ``graft launch`` with 1
or 2 workers (gloo on 127.0.0.1), and ``graft evaluate --watch`` for the sidecar. References
are computed here, in this process, independently: scikit-learn for F1 and AUROC, NumPy for
the Brier score, the stream's own definition for which examples each step must see.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

import graft
from tests.conftest import REPO
from tests.distribute.conftest import finish, graft_launch, load_weights, worker_env
from tests.train import job

JOB = str(REPO / "tests" / "train" / "job.py")


def _launch(workers: int, *args: str, **env: str) -> str:
    """``graft launch --nproc-per-node WORKERS [ARGS]``; its stderr, after checking it ran."""
    proc = graft_launch("--nproc-per-node", str(workers), *args, **env)
    out, err = finish(proc, timeout=300)
    assert proc.returncode == 0, err[-4000:]
    return err


def _reference_metrics(weights: dict) -> dict:
    net = job.model()
    net.load_state_dict(weights)
    data = job.eval_set()
    x, y = data.tensors
    with torch.no_grad():
        logits = net.eval()(x).double()
    probs = logits.softmax(-1).numpy()
    labels = y.numpy()
    one_hot = np.eye(job.CLASSES)[labels]
    return {
        "loss": float(torch.nn.functional.cross_entropy(logits, y)),
        "accuracy": float((probs.argmax(-1) == labels).mean()),
        "f1": f1_score(labels, probs.argmax(-1), average="macro"),
        "auroc": roc_auc_score(labels, probs, multi_class="ovr", average="macro"),
        "brier": float(((probs - one_hot) ** 2).sum(-1).mean()),
        "examples": len(labels),
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_stream_metrics_and_exporters(tmp_path, workers):
    _launch(workers, "--", JOB, "features", str(tmp_path / "run"), str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    weights = load_weights(tmp_path / "out" / "final.safetensors")

    # Exact metrics over the whole evaluation set, whatever the number of workers.
    want = _reference_metrics(weights)
    assert result["examples"] == want["examples"] == job.EVAL_SIZE
    for key in ("loss", "accuracy", "f1", "auroc", "brier"):
        assert result[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key

    # The stream: 12 steps of 8 = 96 examples = epochs 0 and 1 whole, then 22 of epoch 2.
    # Every step's batch is the next 8 records; workers split it without overlap.
    seen = [json.loads((tmp_path / "out" / f"seen-{r}.json").read_text())
            for r in range(workers)]
    assert all(len(s) == 12 for s in seen)
    stream = [i for _ in range(3) for i in range(job.TRAIN_SIZE)]
    for step in range(12):
        batch = stream[step * 8:(step + 1) * 8]
        shares = [seen[r][step] for r in range(workers)]
        assert sorted(sum(shares, [])) == sorted(batch)
        assert all(len(s) == 8 // workers for s in shares)
    counts = collections.Counter(i for s in seen for ids in s for i in ids)
    assert counts == collections.Counter(stream[:96])  # nothing twice per epoch, none dropped

    # Exports: every worker reports the same records; the store keeps the newest two of the
    # best and latest exporters and the final one, whose weights are the final weights.
    records = [json.loads((tmp_path / "out" / f"exported-{r}.json").read_text())
               for r in range(workers)]
    assert all(r == records[0] for r in records)
    by_kind = collections.defaultdict(list)
    for record in records[0]:
        by_kind[record["exporter"]].append(record["step"])
    assert by_kind["latest"] == [4, 8, 12] and by_kind["final"] == [12]
    assert by_kind["best"] and by_kind["best"] == sorted(by_kind["best"])
    stored = {(m.name, m.version) for m in graft.Store().list()}
    assert ("job-final", "1.0.0") in stored
    assert {v for n, v in stored if n == "job-latest"} == {"1.0.0+step8", "1.0.0+step12"}
    assert len({v for n, v in stored if n == "job-best"}) == min(2, len(by_kind["best"]))
    final = graft.load("job-final@1.0.0")
    x = job.eval_set().tensors[0]
    net = job.model()
    net.load_state_dict(weights)
    torch.testing.assert_close(final(x), net.eval()(x), rtol=0, atol=0)
    _, manifest = graft.Store().open("job-final@1.0.0")
    assert manifest.metadata["graft.train"]["step"] == 12


@pytest.mark.parametrize("workers", [1, 2])
def test_stream_killed_at_a_named_step_resumes_to_the_same_weights(tmp_path, workers):
    straight = tmp_path / "straight"
    _launch(workers, "--", JOB, "resume", str(straight / "run"), str(straight))
    # The first run SIGKILLs itself right after step 7 (its last checkpoint is step 6)...
    killed = tmp_path / "killed"
    proc = graft_launch("--nproc-per-node", str(workers), "--", JOB, "resume",
                        str(killed / "run"), str(killed), GRAFT_TEST_STOP_AT="train.step#7")
    _, err = finish(proc, timeout=300)
    assert proc.returncode != 0 and "exitcode: -9" in err, err[-3000:]
    assert sorted(p.name for p in (killed / "run" / "checkpoints").glob("step-*")) == \
        ["step-000000003", "step-000000006"]
    # ...and the same job run again continues from there, mid-epoch of the stream.
    _launch(workers, "--", JOB, "resume", str(killed / "run"), str(killed))
    for rank in range(workers):
        assert (killed / f"started-from-{rank}.txt").read_text() == "step-000000006"
    a, b = load_weights(straight / "weights.safetensors"), load_weights(killed /
                                                                        "weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    untrained = job.model(dropout=0.3).state_dict()
    assert any(not torch.equal(a[k], untrained[k]) for k in a)


def _sidecar(model_dir: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "graft.cli", "evaluate", "--watch",
                             str(model_dir), "--poll", "0.05", JOB, "sidecar", str(model_dir),
                             str(out)], env=worker_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _check_sidecar(out: Path) -> None:
    result = json.loads((out / "sidecar.json").read_text())
    assert result["evaluated"] == [2, 4, 6, 8, 10]  # every checkpoint once, the last too
    records = sorted((out.parent / "run" / "eval").glob("step-*.json"))
    assert [json.loads(p.read_text())["step"] for p in records] == [2, 4, 6, 8, 10]
    for path in records:
        record = json.loads(path.read_text())
        want = _reference_metrics(load_weights(out / f"weights-{record['step']}.safetensors"))
        assert record["metrics"]["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert record["metrics"]["examples"] == job.EVAL_SIZE
    assert json.loads(records[-1].read_text())["final"] is True
    assert [r["handle"] for r in result["exported"]] == ["side-final@1.0.0"]


def test_sidecar_follows_a_running_job(tmp_path):
    side = _sidecar(tmp_path / "run", tmp_path / "out")  # started first: it waits
    _launch(1, "--", JOB, "sidecar", str(tmp_path / "run"), str(tmp_path / "out"))
    out, err = finish(side, timeout=300)
    assert side.returncode == 0, err[-3000:]
    _check_sidecar(tmp_path / "out")
    # keep_checkpoints=1, yet every checkpoint lived until the sidecar had evaluated it
    # (_check_sidecar compared all five with the weights the job had at each).
    assert (tmp_path / "run" / "checkpoints" / "step-000000010").is_dir()


def test_sidecar_started_after_the_job_still_evaluates_every_checkpoint(tmp_path):
    _launch(2, "--", JOB, "sidecar", str(tmp_path / "run"), str(tmp_path / "out"))
    # Nothing evaluated them yet, so all five checkpoints outlived keep_checkpoints=1.
    assert len(list((tmp_path / "run" / "checkpoints").glob("step-*"))) == 5
    side = _sidecar(tmp_path / "run", tmp_path / "out")
    out, err = finish(side, timeout=300)
    assert side.returncode == 0, err[-3000:]
    _check_sidecar(tmp_path / "out")


def test_graft_evaluate_refuses_bad_input_in_one_line(tmp_path):
    def run(*argv: str) -> tuple[int, str]:
        proc = subprocess.run([sys.executable, "-m", "graft.cli", *argv], env=worker_env(),
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stderr

    code, err = run("evaluate", "--watch", str(tmp_path), str(tmp_path / "missing.py"))
    assert code == 1 and err.count("\n") == 1 and "does not exist" in err
    script = tmp_path / "noop.py"
    script.write_text("print('no training here')\n")
    code, err = run("evaluate", "--watch", str(tmp_path), str(script))
    assert code == 1 and "without calling graft.train_and_evaluate" in err
    other = tmp_path / "other.py"
    other.write_text(
        "import sys; sys.path.insert(0, %r)\n"
        "import graft, torch\n"
        "from tests.train import job\n"
        "est = graft.Estimator(job.model(), model_dir=%r, progress=False, tensorboard=False)\n"
        "graft.train_and_evaluate(est, graft.TrainSpec(job.Records(), max_steps=2, "
        "batch_size=8), graft.EvalSpec(job.eval_set()))\n" % (str(REPO), str(tmp_path / "b")))
    code, err = run("evaluate", "--watch", str(tmp_path / "a"), str(other))
    assert code == 1 and "watch the directory it trains in" in err
    assert not (tmp_path / "b").exists()  # the sidecar never trains
