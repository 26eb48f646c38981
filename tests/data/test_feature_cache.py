"""graft.data.feature_cache: frozen-module outputs computed once, verified on every read."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import graft
from graft.errors import DataError, TrainingError
from graft.data import ArrayDataset, ImageFolder, TextTable, split
from graft.data import CachedFeatures, FeatureCache
from tests.conftest import BagOfWords, Pool, write_word_tokenizer

PRE = graft.ImagePreprocess(size=16, resize=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _save_pool(root: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    path = root / f"pool{seed}"
    graft.save(Pool(), path, name="pool", version=str(seed), signatures={
        "features": graft.Signature("features", inputs={"images": "float32[batch,3,16,16]"},
                                    preprocess=PRE)})
    return path


@pytest.fixture(scope="module")
def module_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("modules")
    return _save_pool(root, 0), _save_pool(root, 1)


@pytest.fixture
def module(module_dirs) -> graft.Module:
    return graft.load(module_dirs[0])


class Spy:
    """Counts the forward passes and examples a module runs."""

    def __init__(self, module: graft.Module, monkeypatch: pytest.MonkeyPatch,
                 fail_on_call: int | None = None) -> None:
        self.calls = 0
        self.examples = 0
        real = module.call

        def call(name, *args, **kwargs):
            self.calls += 1
            if self.calls == fail_on_call:
                raise KeyboardInterrupt("simulated interruption")
            self.examples += args[0].shape[0]
            return real(name, *args, **kwargs)

        monkeypatch.setattr(module, "call", call)


def _write(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (18, 22, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for i in range(7):
        _write(root / ("cats" if i < 4 else "dogs") / f"{i}.png", i)
    return root


def _reference(module: graft.Module, data: ImageFolder) -> torch.Tensor:
    """The module run the plain way (past any spy): raw images through its own preprocessing."""
    return graft.Module.call(module, "features", [data[i][0] for i in range(len(data))])


def test_features_match_the_module_and_a_second_pass_runs_nothing(module, photos, tmp_path,
                                                                   monkeypatch):
    data = ImageFolder(photos)
    spy = Spy(module, monkeypatch)
    features, labels = FeatureCache(tmp_path / "cache").features(module, "features", data,
                                                                 batch_size=3, progress=False)
    assert features.shape == (7, 4) and features.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == data.labels
    assert (spy.calls, spy.examples) == (3, 7)  # batches of 3, 3, 1
    torch.testing.assert_close(features, _reference(module, data))

    # A new run: new cache object, new dataset object, same files.
    again, _ = FeatureCache(tmp_path / "cache").features(module, "features", ImageFolder(photos),
                                                         progress=False)
    assert spy.calls == 3
    torch.testing.assert_close(again, features, rtol=0, atol=0)
    assert not list((tmp_path / "cache" / "shards").glob(".*.tmp"))  # no half-written shard
    for shard in (tmp_path / "cache" / "shards").iterdir():
        assert hashlib.sha256(shard.read_bytes()).hexdigest() + ".safetensors" == shard.name


def test_a_changed_image_is_the_only_one_recomputed(module, photos, tmp_path, monkeypatch):
    old = time.time() - 3600
    for path in photos.rglob("*.png"):
        os.utime(path, (old, old))  # settled files: their hashes are reused while unchanged
    data = ImageFolder(photos)
    cache = FeatureCache(tmp_path / "cache")
    before, _ = cache.features(module, "features", data, progress=False)
    spy = Spy(module, monkeypatch)
    _write(photos / "cats" / "2.png", 100)
    after, _ = cache.features(module, "features", data, progress=False)  # same dataset object
    assert spy.examples == 1
    torch.testing.assert_close(after[[0, 1, 3, 4, 5, 6]], before[[0, 1, 3, 4, 5, 6]],
                               rtol=0, atol=0)
    torch.testing.assert_close(after, _reference(module, data))
    assert not torch.equal(after[2], before[2])


def test_another_module_digest_has_its_own_entries(module, module_dirs, photos, tmp_path,
                                                   monkeypatch):
    other = graft.load(module_dirs[1])
    assert other.digest != module.digest
    data = ImageFolder(photos)
    cache = FeatureCache(tmp_path / "cache")
    first, _ = cache.features(module, "features", data, progress=False)
    spy_other, spy = Spy(other, monkeypatch), Spy(module, monkeypatch)
    second, _ = cache.features(other.signature("features"), None, data, progress=False)
    assert spy_other.examples == 7
    torch.testing.assert_close(second, _reference(other, data))
    assert not torch.allclose(first, second)
    cache.features(module, "features", data, progress=False)
    assert spy.examples == 0
    assert len(cache) == 14


def test_a_corrupt_shard_is_detected_and_recomputed(module, photos, tmp_path, monkeypatch):
    data = ImageFolder(photos)
    cache = FeatureCache(tmp_path / "cache", shard_size=4)
    good, _ = cache.features(module, "features", data, batch_size=4, progress=False)
    shards = sorted((tmp_path / "cache" / "shards").iterdir())
    assert len(shards) == 2
    victim = next(s for s in shards if s.stat().st_size == max(p.stat().st_size for p in shards))
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the feature values: still parses as safetensors
    victim.write_bytes(bytes(raw))

    spy = Spy(module, monkeypatch)
    with pytest.warns(RuntimeWarning, match="is unusable .*sha256 does not match.*4 entries"):
        again, _ = cache.features(module, "features", data, batch_size=4, progress=False)
    assert spy.examples == 4
    torch.testing.assert_close(again, good, rtol=0, atol=0)
    assert not victim.exists()
    cache.features(module, "features", data, progress=False)
    assert spy.examples == 4  # the recomputed entries are cached again


def test_a_missing_shard_is_recomputed(module, photos, tmp_path, monkeypatch):
    data = ImageFolder(photos)
    cache = FeatureCache(tmp_path / "cache")
    good, _ = cache.features(module, "features", data, progress=False)
    for shard in (tmp_path / "cache" / "shards").iterdir():
        shard.unlink()
    spy = Spy(module, monkeypatch)
    with pytest.warns(RuntimeWarning, match="the file is missing"):
        again, _ = cache.features(module, "features", data, progress=False)
    assert spy.examples == 7
    torch.testing.assert_close(again, good, rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["delete", "garbage"])
def test_a_lost_index_is_rebuilt_from_the_shards(module, photos, tmp_path, monkeypatch, damage):
    data = ImageFolder(photos)
    good, _ = FeatureCache(tmp_path / "cache").features(module, "features", data, progress=False)
    index = tmp_path / "cache" / "index.sqlite"
    if damage == "delete":
        index.unlink()
        cache = FeatureCache(tmp_path / "cache")
    else:
        index.write_bytes(b"this is not a database" * 100)
        with pytest.warns(RuntimeWarning, match="is unreadable"):
            cache = FeatureCache(tmp_path / "cache")
    spy = Spy(module, monkeypatch)
    again, _ = cache.features(module, "features", data, progress=False)
    assert spy.calls == 0
    torch.testing.assert_close(again, good, rtol=0, atol=0)


def test_an_interrupted_run_keeps_what_it_finished(module, photos, tmp_path, monkeypatch):
    data = ImageFolder(photos)
    cache = FeatureCache(tmp_path / "cache", shard_size=2)
    Spy(module, monkeypatch, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        cache.features(module, "features", data, batch_size=2, progress=False)
    assert len(cache) == 4  # two finished batches, each in its own shard
    assert not list((tmp_path / "cache" / "shards").glob(".*.tmp"))  # no half-written shard
    monkeypatch.undo()
    spy = Spy(module, monkeypatch)
    features, _ = cache.features(module, "features", data, batch_size=2, progress=False)
    assert spy.examples == 3
    torch.testing.assert_close(features, _reference(module, data))


def test_duplicates_are_computed_once_and_subsets_share_entries(module, tmp_path, monkeypatch):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    images = np.concatenate([pixels, pixels[:3]])  # 3 duplicates
    data = ArrayDataset(images, [0, 1, 0, 1, 0, 0, 1, 0])
    spy = Spy(module, monkeypatch)
    cache = FeatureCache(tmp_path / "cache")
    features, labels = cache.features(module, "features", data, progress=False)
    assert spy.examples == 5 and features.shape == (8, 4)
    torch.testing.assert_close(features[5:], features[:3], rtol=0, atol=0)
    assert labels.tolist() == data.labels
    train, val = split(data, validation=0.25)
    val_features, val_labels = cache.features(module, "features", val, progress=False)
    assert spy.examples == 5
    torch.testing.assert_close(val_features, features[val.indices], rtol=0, atol=0)
    assert val_labels.tolist() == val.labels


def test_preprocessed_tensors_and_cached_features_dataset(module, tmp_path):
    tensors = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    data = ArrayDataset(tensors, ["a", "b", "a", "b", "a", "b"])
    cached = FeatureCache(tmp_path / "cache").dataset(module, "features", data, batch_size=4,
                                                      progress=False)
    assert isinstance(cached, CachedFeatures)
    assert len(cached) == 6 and cached.dim == 4 and cached.classes == ["a", "b"]
    torch.testing.assert_close(cached.features, module.call("features", tensors))
    feature, label = cached[1]
    assert feature.shape == (4,) and label == 1
    x, y = next(iter(DataLoader(cached, batch_size=4)))
    assert x.shape == (4, 4) and y.tolist() == [0, 1, 0, 1]


def test_text_features(tmp_path, monkeypatch):
    write_word_tokenizer(tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    graft.save(BagOfWords(dim=3), tmp_path / "embed", name="embed", version="1", signatures={
        "embed": graft.Signature(
            inputs={"input_ids": "int64[batch,seq]", "attention_mask": "int64[batch,seq]"},
            preprocess=graft.TextPreprocess("assets/tokenizer.json", max_length=4))},
        assets={"tokenizer.json": tmp_path / "tokenizer.json"})
    module = graft.load(tmp_path / "embed")
    table = tmp_path / "t.jsonl"
    table.write_text('{"text": "the cat sat", "label": "pet"}\n{"text": "dog", "label": "pet"}\n'
                     '{"text": "the", "label": "word"}\n')
    data = TextTable(table)
    cache = FeatureCache(tmp_path / "cache")
    features, labels = cache.features(module, "embed", data, progress=False)
    torch.testing.assert_close(features, module.call("embed", data.texts))
    assert labels.tolist() == [0, 0, 1]
    calls = []
    monkeypatch.setattr(module, "call", lambda *a, **k: calls.append(a))
    cache.features(module, "embed", data, progress=False)
    assert calls == []


def test_bad_uses_are_clear_errors(module, module_dirs, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    empty = TensorDataset(torch.empty(0, 3, 16, 16), torch.empty(0, dtype=torch.int64))
    with pytest.raises(DataError, match="empty dataset"):
        cache.features(module, "features", empty, progress=False)
    data = ArrayDataset(torch.zeros(2, 3, 16, 16), [0, 1])
    with pytest.raises(DataError, match="no output 'logits'; it has \\['output'\\]"):
        cache.features(module, "features", data, progress=False, output="logits")
    trainable = graft.load(module_dirs[0], trainable=True)
    with pytest.raises(TrainingError, match="is trainable.*trainable=False"):
        cache.features(trainable, "features", data, progress=False)
    assert len(cache) == 0


def test_eval_mode_and_no_grad_then_the_mode_is_restored(module, tmp_path, monkeypatch):
    seen = []
    real = module.call

    def call(name, *args, **kwargs):
        seen.append((module.training, torch.is_grad_enabled()))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(module, "call", call)
    module.train()
    data = ArrayDataset(torch.zeros(2, 3, 16, 16), [0, 1])
    features, _ = FeatureCache(tmp_path / "c").features(module, "features", data, progress=False)
    assert seen == [(False, False)] and module.training and not features.requires_grad
