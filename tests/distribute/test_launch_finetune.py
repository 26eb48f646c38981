"""`graft launch -- graft finetune`: the command-line fine-tuning, on two worker processes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import graft
from tests.conftest import env_with_src, write_image_folder
from tests.train.test_premade import backbone, colour_images  # noqa: F401 (a fixture)


@pytest.mark.timeout(240)
def test_launch_two_workers_finetune_and_export_once(backbone, tmp_path):  # noqa: F811
    write_image_folder(colour_images(40), tmp_path / "photos")
    out = subprocess.run(
        [sys.executable, "-m", "graft.cli", "launch", "--nproc-per-node", "2", "--",
         "graft", "finetune", "--module", backbone, "--data", str(tmp_path / "photos"),
         "--out", "launched@1", "--epochs", "10", "--batch-size", "8", "--lr", "0.05",
         "--model-dir", str(tmp_path / "run")],
        capture_output=True, text=True, env=env_with_src() | {"OMP_NUM_THREADS": "1"},
        timeout=220)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("exported launched@1") == 1  # only the chief exports and reports
    assert out.stdout.count("validation: accuracy") == 1
    module = graft.load("launched@1")
    assert module.manifest.parents[0].handle == backbone
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
