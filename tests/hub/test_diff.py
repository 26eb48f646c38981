"""graft diff: what a child changed, from the manifests alone."""

from __future__ import annotations

import subprocess
import sys

from graft.hub.diff import diff_manifests, diff_modules
from tests.conftest import env_with_src
from tests.hub.oci.conftest import saved  # noqa: F401  (the fixture: real saved modules)


def test_a_head_only_child_differs_in_its_head(saved):
    diff = diff_modules(saved.parent, saved.child)
    assert diff.tensors_changed == ("head.bias", "head.weight")
    assert diff.tensors_added == diff.tensors_removed == ()
    assert diff.tensors_same == len(saved.parent_manifest.tensors) - 2
    assert diff.changed_bytes == (3 * 1024 + 3) * 4  # the new head, float32
    assert "weights.safetensors" in diff.files_changed
    text = diff.render()
    assert "~ head.weight  float32[2,1024]" in text and "-> float32[3,1024]" in text
    assert "parents" in text  # the manifest fields that differ


def test_a_module_is_identical_to_itself(saved):
    diff = diff_manifests(saved.parent_manifest, saved.parent_manifest)
    assert diff.identical and diff.render().endswith("identical modules")


def test_the_cli_prints_the_diff(saved, graft_home):
    out = subprocess.run([sys.executable, "-m", "graft.cli", "diff", str(saved.parent),
                          str(saved.child)], capture_output=True, text=True,
                         env=env_with_src(), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "2 changed" in out.stdout and "head.weight" in out.stdout
