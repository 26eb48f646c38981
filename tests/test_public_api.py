"""Each package's __all__ is sorted and lists exactly its public names; import graft is light."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from tests.conftest import env_with_src

PACKAGES = ["graft", "graft.errors", "graft.format.spec", "graft.format.manifest",
            "graft.export.save", "graft.runtime.load", "graft.runtime.module",
            "graft.hub.handles", "graft.hub.store", "graft.train.losses", "graft.train.data",
            "graft.train.feature_cache", "graft.train.estimator", "graft.train.specs",
            "graft.train.checkpoint", "graft.train.metrics", "graft.train.premade", "graft.distribute.strategy", "graft.distribute.data_parallel",
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
