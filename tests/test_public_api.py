"""Each package's __all__ is sorted and lists exactly its public names; import graft is light."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from tests.conftest import env_with_src

PACKAGES = ["graft", "graft.errors", "graft.format.spec", "graft.format.manifest",
            "graft.format.arguments", "graft.format.entries", "graft.format.graph",
            "graft.export.save", "graft.runtime.load", "graft.runtime.module",
            "graft.hub.handles", "graft.hub.store", "graft.hub.diff", "graft.hub.oci",
            "graft.hub.blobs", "graft.hub.gc", "graft.hub.index", "graft.hub.install",
            "graft.hub.leases", "graft.hub.lookup", "graft.hub.reading", "graft.hub.staging",
            "graft.hub.trees",
            "graft.runtime.verify", "graft._testing", "graft._terminal",
            "graft.hub.oci.artifact", "graft.hub.oci.cache", "graft.hub.oci.client",
            "graft.hub.oci.credentials", "graft.hub.oci.pull", "graft.hub.oci.push",
            "graft.hub.oci.reference", "graft.hub.oci.referrers", "graft.hub.oci.transfer",
            "graft.losses.base", "graft.losses.softmax", "graft.losses.sigmoid",
            "graft.losses.kl", "graft.data.arrays", "graft.data.collation",
            "graft.data.feature_cache", "graft.data.fingerprints", "graft.data.image_folder",
            "graft.data.labels", "graft.data.splits", "graft.data.text_table",
            "graft.train.estimator", "graft.train.specs",
            "graft.train.checkpoint", "graft.train.metrics", "graft.train.premade",
            "graft.train.batches", "graft.train.checks", "graft.train.custom_metrics",
            "graft.train.evaluation", "graft.train.events", "graft.train.exporters",
            "graft.train.hooks", "graft.train.inference", "graft.train.interrupt",
            "graft.train.resume", "graft.train.rng", "graft.train.sampling",
            "graft.train.sidecar", "graft.train.train_and_evaluate", "graft.train.training",
            "graft.distribute.strategy", "graft.distribute.data_parallel",
            "graft.distribute.launch", "graft.distribute.batch_norm", "graft.settings",
            "graft.train", "graft.distribute", "graft.data", "graft.losses", "graft.zoo"]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_sorted_and_complete(name):
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == sorted(exported)
    for item in exported:
        assert getattr(module, item) is not None
    if name != "graft":  # the top level re-exports lazily; checked below
        public = {k for k, v in vars(module).items() if not k.startswith("_")
                  and getattr(v, "__module__", None) == name}
        assert public <= set(exported), f"public but not in __all__: {public - set(exported)}"


def test_every_lazy_name_resolves():
    import graft

    for item in graft.__all__:
        assert getattr(graft, item) is not None


def test_import_graft_does_not_import_torch():
    code = "import sys, graft; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env_with_src(), check=True)
    assert out.stdout.strip() == "False"
