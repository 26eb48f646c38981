"""Premade classifiers: a hub module's features + a new head, trained, exported, reloaded."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import graft
from graft.errors import DataError, SignatureError
from graft.data import ArrayDataset, TextTable
from graft.train.premade import ImageClassifier, TextClassifier
from tests.conftest import BagOfWords, env_with_src, write_image_folder, write_word_tokenizer

PRE = graft.ImagePreprocess(size=16, resize=16, mean=(0.5,) * 3, std=(0.5,) * 3)


class Blocks(nn.Module):
    """Three numbered conv blocks and a pooled 8-d feature."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1),
                                                    nn.BatchNorm2d(8), nn.ReLU())
                                      for _ in range(3)])

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(images)).mean(dim=(2, 3))  # (B, 8)


@pytest.fixture
def backbone(tmp_path):
    torch.manual_seed(0)
    graft.save(Blocks(), "blocks@1.0.0", signatures={"features": graft.Signature(
        "features", inputs={"images": "float32[batch,3,16,16]"}, preprocess=PRE)})
    return "blocks@1.0.0"


def colour_images(n: int, seed: int = 0) -> ArrayDataset:
    """Reddish vs bluish noise images: separable by a linear probe on mean features."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 120, (n, 20, 20, 3), dtype=np.uint8)
    images[labels == 0, ..., 0] += 130
    images[labels == 1, ..., 2] += 130
    return ArrayDataset(images, labels, classes=["red", "blue"])


def test_head_training_uses_the_feature_cache(backbone, tmp_path):
    clf = ImageClassifier(backbone, classes=["red", "blue"], progress=False,
                          cache_dir=tmp_path / "cache", learning_rate=0.05, tensorboard=False)
    calls = []
    clf.backbone.signature("features").register_forward_hook(lambda *a: calls.append(1))
    train, test = colour_images(64), colour_images(32, seed=1)
    frozen = {k: v.clone() for k, v in clf.backbone.state_dict().items()}
    clf.train(train, epochs=20, batch_size=16)
    first = len(calls)
    assert first > 0
    clf.train(train, epochs=5, batch_size=16)  # later epochs: no backbone forward passes
    assert len(calls) == first
    metrics = clf.evaluate(test)
    assert metrics["accuracy"] >= 0.9 and metrics["examples"] == 32
    for key, value in clf.backbone.state_dict().items():
        assert torch.equal(value, frozen[key])
    assert clf.classify([test[0][0], test[1][0]]) == ["red", "blue"]


def test_fine_tune_all_exports_and_reloads_in_a_fresh_process(backbone, tmp_path, graft_home):
    clf = ImageClassifier(backbone, classes=["red", "blue"], fine_tune="all", progress=False,
                          learning_rate=0.01, tensorboard=False)
    before = clf.backbone.weights.stem.weight.detach().clone()
    clf.train(colour_images(32), epochs=3, batch_size=8)
    assert not torch.equal(clf.backbone.weights.stem.weight, before)
    clf.evaluate(colour_images(16, seed=2))
    saved = clf.export("colours@1.0.0")
    test = colour_images(6, seed=3)
    expected = clf.predict(test)
    np.save(tmp_path / "images.npy", np.stack([test[i][0] for i in range(6)]))
    code = ("import graft, numpy as np, torch, json\n"
            f"m = graft.load('colours@1.0.0')\n"
            f"x = list(np.load({str(tmp_path / 'images.npy')!r}))\n"
            "with torch.no_grad(): p = m(x).softmax(-1)\n"
            "print(json.dumps({'p': p.tolist(), 'parents': [x.digest for x in m.manifest.parents],"
            " 'labels': m.asset_path('labels.txt').read_text().split()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env_with_src(), check=True)
    import json

    result = json.loads(out.stdout)
    torch.testing.assert_close(torch.tensor(result["p"]), expected, rtol=1e-5, atol=1e-6)
    assert result["parents"] == [graft.Store().resolve(backbone).digest]
    assert result["labels"] == ["red", "blue"]
    assert saved.handle == "colours@1.0.0"


def test_fine_tune_last_blocks_only(backbone):
    clf = ImageClassifier(backbone, classes=["red", "blue"], fine_tune=1, progress=False,
                          tensorboard=False)
    trainable = {n for n, p in clf.backbone.weights.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.2.0.weight", "blocks.2.0.bias", "blocks.2.1.weight",
                         "blocks.2.1.bias"}
    with pytest.raises(DataError, match="has 3 blocks"):
        ImageClassifier(backbone, classes=["red", "blue"], fine_tune=4, progress=False)


@pytest.fixture
def text_module(tmp_path):
    words = ("[PAD]", "[UNK]", "good", "great", "bad", "awful", "film", "plot")
    write_word_tokenizer(tmp_path / "tokenizer.json", words)
    torch.manual_seed(0)
    graft.save(BagOfWords(len(words), dim=6), "bow@1.0.0", signatures={"embed": graft.Signature(
        inputs={"input_ids": "int64[batch,seq]", "attention_mask": "int64[batch,seq]"},
        preprocess=graft.TextPreprocess("assets/tokenizer.json", max_length=8))},
        assets={"tokenizer.json": tmp_path / "tokenizer.json"})
    return "bow@1.0.0"


def test_text_classifier_from_csv(text_module, tmp_path):
    rows = [f"{a} {b},pos" for a in ("good", "great") for b in ("film", "plot")]
    rows += [f"{a} {b},neg" for a in ("bad", "awful") for b in ("film", "plot")]
    (tmp_path / "reviews.csv").write_text("text,label\n" + "\n".join(rows * 4) + "\n")
    data = TextTable(tmp_path / "reviews.csv", classes=["neg", "pos"])
    clf = TextClassifier(text_module, classes=["neg", "pos"], progress=False, learning_rate=0.1,
                         tensorboard=False, cache_dir=tmp_path / "cache")
    clf.train(data, epochs=30, batch_size=8)
    assert clf.evaluate(data)["accuracy"] == 1.0
    assert clf.classify(["great plot", "awful film"]) == ["pos", "neg"]

    (tmp_path / "bad.csv").write_text("text,label\ngood film,pos\nmeh,neutral\n")
    with pytest.raises(DataError, match="neutral"):
        TextTable(tmp_path / "bad.csv", classes=["neg", "pos"])


def test_bad_inputs_write_nothing_to_the_store(backbone, tmp_path):
    before = [m.digest for m in graft.Store().list()]
    with pytest.raises(DataError, match="at least two"):
        ImageClassifier(backbone, classes=["only"], progress=False)
    clf = ImageClassifier(backbone, classes=["red", "blue"], fine_tune="all", progress=False,
                          tensorboard=False)
    with pytest.raises(DataError, match="classes"):
        clf.train(ArrayDataset(np.zeros((4, 8, 8, 3), np.uint8), [0, 1, 2, 0],
                               classes=["a", "b", "c"]), epochs=1)
    with pytest.raises(DataError, match="empty"):
        clf.train([], epochs=1)
    wrong_size = [(torch.randn(3, 32, 32), 0), (torch.randn(3, 32, 32), 1)]
    with pytest.raises(SignatureError, match=r"float32\[batch,3,16,16\]"):
        clf.train(wrong_size, epochs=1, batch_size=2)
    assert [m.digest for m in graft.Store().list()] == before


def test_graft_finetune_command(backbone, tmp_path, graft_home):
    write_image_folder(colour_images(40), tmp_path / "photos")
    out = subprocess.run(
        [sys.executable, "-m", "graft.cli", "finetune", "--module", backbone, "--data",
         str(tmp_path / "photos"), "--out", "photo-colours@1", "--epochs", "20",
         "--batch-size", "8", "--lr", "0.05"],
        capture_output=True, text=True, env=env_with_src(), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "40 examples in 2 classes ['blue', 'red']" in out.stdout
    assert "exported photo-colours@1" in out.stdout
    accuracy = float(out.stdout.split("validation: accuracy ")[1].split(",")[0])
    assert accuracy >= 0.75
    module = graft.load("photo-colours@1")
    assert module.manifest.parents[0].handle == backbone

    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "graft.cli", "finetune", "--module", backbone, "--data",
         str(empty), "--out", "nothing@1"], capture_output=True, text=True,
        env=env_with_src(), timeout=300)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "nothing" not in {m.name for m in graft.Store().list()}
