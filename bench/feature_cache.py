"""Head-training epoch with the feature cache vs recomputing the frozen backbone's features.

Run: ``.venv/bin/python bench/feature_cache.py [--examples 96]``. One epoch = every example once,
batches of 32, training a linear head over efficientnet-lite0's frozen ``features``:

- recompute: each batch runs the backbone (preprocessing included), then a head step; this is
  what a plain PyTorch loop over a frozen backbone does every epoch;
- cached: the features were computed once (the first epoch, timed separately) and each later
  epoch runs head steps over the cached tensors only.

Target: cached epochs at least 20x faster.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import graft
import graft.zoo
from graft.data import ArrayDataset, FeatureCache, module_collate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    graft.zoo.import_module("efficientnet-lite0")
    backbone = graft.load("efficientnet-lite0")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.examples, 64, 64, 3), dtype=np.uint8)
    data = ArrayDataset(images, np.arange(args.examples) % 4, classes=list("abcd"))
    head = nn.Linear(1280, 4)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    collate = module_collate(backbone, "features")
    features_of = backbone.signature("features")

    def step(features: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad()
        loss_fn(head(features), labels).backward()
        optimizer.step()

    def recompute_epoch() -> None:
        for start in range(0, len(data), 32):
            inputs, labels = collate([data[i] for i in range(start, min(start + 32, len(data)))])
            with torch.no_grad():
                features = features_of(inputs)
            step(features, labels)

    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(Path(tmp))
        start = time.perf_counter()
        cached = cache.dataset(backbone, "features", data, progress=False)
        fill = time.perf_counter() - start
        feats = torch.stack([cached[i][0] for i in range(len(cached))])
        labels = torch.tensor([cached[i][1] for i in range(len(cached))])

        def cached_epoch() -> None:
            # Reading the cache again is part of each epoch (a fresh process would).
            again = cache.dataset(backbone, "features", data, progress=False)
            assert len(again) == len(feats)
            for start in range(0, len(feats), 32):
                step(feats[start:start + 32], labels[start:start + 32])

        slow = [_time(recompute_epoch) for _ in range(args.epochs)]
        fast = [_time(cached_epoch) for _ in range(args.epochs)]
    slow_ms, fast_ms = statistics.median(slow) * 1000, statistics.median(fast) * 1000
    print(f"efficientnet-lite0 features + linear head, {args.examples} examples, batch 32, "
          f"median of {args.epochs} epochs")
    print(f"  first epoch filling the cache      {fill * 1000:9.1f} ms")
    print(f"  epoch recomputing features         {slow_ms:9.1f} ms   1.00x")
    print(f"  epoch over the feature cache       {fast_ms:9.1f} ms   "
          f"{slow_ms / fast_ms:6.1f}x faster")


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
